"""Token-level signals of the baselines named by the papers (arXiv:2605.27115 §4.2; Relaxed OPD arXiv:2603.11137,
SelecTKD arXiv:2510.24021): Relaxed OPD, SelecTKD, ExOPD.

Each function maps rollout-time per-token quantities to a reward/advantage or a token weight; the method
registry (``methods.py``) combines them with the shared policy-gradient loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_camopd.algo.params import MethodParams
from megatron_camopd.algo.tokens import as_bool_mask, masked_fill_zero
from megatron_camopd.checks import in_range, path_field, positive
from megatron_camopd.errors import SpecError


@dataclass
class RelaxedParams(MethodParams):
    """Relaxed OPD (REOPOLD, `method.relaxed`): reward floor log(lam/(1-lam)) and entropy top-beta token sampling."""

    lam: float = 0.2
    beta: float = 0.5

    def validate(self) -> None:
        super().validate()
        in_range(self, "lam", 0.0, 1.0, low_open=True, high_open=True)
        in_range(self, "beta", 0.0, 1.0, low_open=True, high_open=False)


@dataclass
class SelecTKDParams(MethodParams):
    """SelecTKD (`method.selectkd`): a token is accepted when the student's top-1 is in the teacher's top-k;
    rejected tokens weigh beta."""

    k: int = 5
    beta: float = 0.01

    def validate(self) -> None:
        super().validate()
        positive(self, "k")
        in_range(self, "beta", 0.0, 1.0, low_open=False, high_open=False)


@dataclass
class ExOPDParams(MethodParams):
    """ExOPD (G-OPD, `method.exopd`): A = lam (log pi_T - log pi_ref) - (log pi_s - log pi_ref)."""

    lam: float = 1.25
    reference: str | None = path_field()  # the frozen reference model; None: the initial student

    def validate(self) -> None:
        super().validate()
        positive(self, "lam")


def relaxed_reward(delta: Tensor, lam: float = 0.2) -> Tensor:
    """Relaxed OPD reward floor ``max(sg[delta], log(lam / (1 - lam)))`` (default ``lam = 0.2``: floor -1.386)."""
    if not 0.0 < lam < 1.0:
        raise SpecError(f"relaxed_lambda: expected 0 < lambda < 1, got {lam}")
    return delta.detach().clamp(min=math.log(lam / (1.0 - lam)))


def entropy_token_mask(entropy: Tensor, mask: Tensor, beta: float = 0.5) -> Tensor:
    """Float ``[B, T]``: 1 on the ``ceil(beta * N)`` response tokens of highest entropy in the batch, else 0.

    ``N`` counts the batch's response tokens; ties at the threshold are broken by position (row-major), so
    exactly ``ceil(beta * N)`` tokens are kept. Non-finite entropies are never kept.
    """
    if not 0.0 < beta <= 1.0:
        raise SpecError(f"relaxed_beta: expected 0 < beta <= 1, got {beta}")
    m = as_bool_mask(mask)
    flat_m = m.flatten()
    ent = entropy.detach().flatten().to(torch.float64)
    ent = torch.where(flat_m & torch.isfinite(ent), ent, torch.full_like(ent, -math.inf))
    n = int(flat_m.sum())
    out = torch.zeros_like(ent)
    k = math.ceil(beta * n)
    if k > 0:
        idx = torch.sort(ent, descending=True, stable=True).indices[:k]
        out[idx] = 1.0
    out = torch.where(flat_m & (ent > -math.inf), out, torch.zeros_like(out))
    return out.view_as(entropy).to(entropy.dtype if entropy.is_floating_point() else torch.float32)


def selectkd_weights(
    student_top1: Tensor,
    teacher_topk_ids: Tensor,
    mask: Tensor,
    k: int = 5,
    beta: float = 0.01,
) -> tuple[Tensor, float]:
    """SelecTKD propose-and-verify: ``(token_weight [B, T], acceptance_rate)``.

    A token is accepted when the student's top-1 id is among the teacher's first ``k`` top ids (the teacher's
    list is ordered by descending probability, as SGLang returns it); accepted tokens weigh 1, rejected ones
    ``beta`` (0 = mask). The acceptance rate is over response tokens (nan when there are none).
    """
    if not isinstance(k, int) or k < 1:
        raise SpecError(f"selectkd_k: expected an integer >= 1, got {k!r}")
    if not 0.0 <= beta <= 1.0:
        raise SpecError(f"selectkd_beta: expected 0 <= beta <= 1, got {beta}")
    if teacher_topk_ids.shape[-1] < k:
        raise SpecError(f"selectkd_k: teacher returned only {teacher_topk_ids.shape[-1]} top ids, k = {k}")
    m = as_bool_mask(mask)
    accepted = (teacher_topk_ids[..., :k] == student_top1.unsqueeze(-1)).any(dim=-1) & m
    w = torch.where(accepted, 1.0, beta).float()
    n = int(m.sum())
    rate = float(accepted.sum()) / n if n else float("nan")
    return masked_fill_zero(w, m), rate


def exopd_advantage(
    teacher_lp: Tensor,
    student_lp: Tensor,
    ref_lp: Tensor,
    mask: Tensor,
    lam: float = 1.25,
) -> Tensor:
    """ExOPD (G-OPD) advantage ``lam (lp_T - lp_ref) - (lp_s - lp_ref)``, detached, 0 on padding.

    ``lam = 1`` reduces to the plain OPD gap ``lp_T - lp_s``.
    """
    if not lam > 0:
        raise SpecError(f"exopd_lambda: expected lambda > 0, got {lam}")
    adv = lam * (teacher_lp - ref_lp) - (student_lp - ref_lp)
    return masked_fill_zero(adv.detach(), mask)
