"""CaMOPD building blocks (CaMOPD (arXiv:2605.27115) §3.3, Eqs. (5)-(9)): branch schedule, gap scores, mass-target
selection, branch scales.

CaMOPD decouples the general-recovery branch (teacher = original model) from the domain-preservation branch
(teacher = specialised model) with an alternating schedule ``G x n_g, D``, scores each rollout by its token-gap
mass, and keeps only the smallest set of highest-scoring samples that carries ``rho`` of the branch's gap mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor

from megatron_camopd.algo.params import MethodParams
from megatron_camopd.algo.tokens import masked_seq_mean
from megatron_camopd.checks import in_range, positive
from megatron_camopd.errors import CheckpointError, SpecError

Branch = Literal["general", "domain"]
BRANCHES: tuple[str, ...] = ("general", "domain")


@dataclass
class CaMOPDParams(MethodParams):
    """CaMOPD's selection and branch scales, flat in the spec's `method` section (`method.rho_g`, ...)."""

    selection: bool | None = None  # gap-based mass-target selection; None: the method's default (on for camopd)
    # which k_b samples selection keeps: "gap" (the paper's top-gap prefix) or "random" (as many, at random: the
    # ablation of which samples are chosen at the same kept fraction)
    selection_order: Literal["gap", "random"] = "gap"
    rho_g: float = 0.8  # gap mass the general branch keeps
    rho_d: float = 0.8  # gap mass the domain branch keeps
    r_g: float = 2.0  # branch scale of the general branch
    r_d: float = 1.0  # branch scale of the domain branch

    def validate(self) -> None:
        super().validate()
        positive(self, "r_g", "r_d")
        in_range(self, "rho_g", 0.0, 1.0, low_open=True, high_open=False)
        in_range(self, "rho_d", 0.0, 1.0, low_open=True, high_open=False)

    def resolve(self, method: Any) -> None:
        if self.selection is None:
            self.selection = bool(method.default_selection)


class BranchSchedule:
    """Which branch the next optimizer step trains on; its position is training state (checkpointed).

    ``mode="alternate"``: period ``n_g + n_d``: ``n_g`` general steps then ``n_d`` domain steps
    (default G,G,G,D,...). ``mode="mixed"`` (vanilla MOPD): every step is ``"mixed"``; ``ratio`` = (general,
    domain) prompt ratio, any non-negative numbers with a positive sum ((3, 1) and (0.75, 0.25) are the same
    ratio), see :meth:`split`.
    """

    def __init__(
        self,
        mode: Literal["alternate", "mixed"] = "alternate",
        n_g: int = 3,
        n_d: int = 1,
        ratio: tuple[float, float] = (1, 1),
    ) -> None:
        if mode not in ("alternate", "mixed"):
            raise SpecError(f"schedule.mode: expected 'alternate' or 'mixed', got {mode!r}")
        if not isinstance(n_g, int) or n_g < 0:
            raise SpecError(f"schedule.n_g: expected an integer >= 0, got {n_g!r}")
        if not isinstance(n_d, int) or n_d < 0:
            raise SpecError(f"schedule.n_d: expected an integer >= 0, got {n_d!r}")
        if mode == "alternate" and n_g + n_d == 0:
            raise SpecError("schedule.n_g: n_g + n_d must be > 0")
        if (
            len(ratio) != 2
            or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0 for r in ratio
            )
            or sum(ratio) == 0
        ):
            raise SpecError(f"schedule.mix_ratio: expected two finite numbers >= 0, not both 0, got {ratio!r}")
        self.mode = mode
        self.n_g = n_g
        self.n_d = n_d
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.step = 0

    @property
    def period(self) -> int:
        """Length of one schedule cycle in steps."""
        return self.n_g + self.n_d if self.mode == "alternate" else 1

    def at(self, step: int) -> str:
        """The branch of absolute step ``step`` (pure function of the step index)."""
        if self.mode == "mixed":
            return "mixed"
        return "general" if step % self.period < self.n_g else "domain"

    def peek(self) -> str:
        """The branch the next call to :meth:`next` will return, without advancing."""
        return self.at(self.step)

    def next(self) -> str:
        """Return the current step's branch and advance."""
        branch = self.at(self.step)
        self.step += 1
        return branch

    def split(self, n_prompts: int) -> tuple[int, int]:
        """(general, domain) prompt counts for a mixed step of ``n_prompts``: general = round_half_up(n * g /
        (g + d)), in exact rational arithmetic (the same numbers as `config.ScheduleConfig.split`)."""
        g, d = (Fraction(r) for r in self.ratio)
        n_general = math.floor(n_prompts * g / (g + d) + Fraction(1, 2))
        return n_general, n_prompts - n_general

    def state_dict(self) -> dict[str, float]:
        """JSON-serialisable state: the step counter plus the configuration it is valid for."""
        return {
            "step": self.step,
            "n_g": self.n_g,
            "n_d": self.n_d,
            "ratio_g": self.ratio[0],
            "ratio_d": self.ratio[1],
            "mixed": int(self.mode == "mixed"),
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Resume exactly; raises :class:`CheckpointError` if the checkpoint's schedule differs."""
        mine = self.state_dict()
        for key in ("n_g", "n_d", "ratio_g", "ratio_d", "mixed"):
            if key in state and float(state[key]) != mine[key]:
                raise CheckpointError(f"schedule.{key}: checkpoint has {state[key]}, config has {mine[key]}")
        if "step" not in state or int(state["step"]) < 0:
            raise CheckpointError(f"schedule state has no valid 'step': {state!r}")
        self.step = int(state["step"])


def gap_scores(delta: Tensor, mask: Tensor, branch: str | Sequence[str]) -> Tensor:
    """Per-sample gap score ``[B]``: general ``(1/T_i) sum_t |delta|``, domain ``(1/T_i) sum_t [delta]_+``.

    ``branch`` is one branch for the whole batch or one per sample.
    """
    abs_mean = masked_seq_mean(delta.abs(), mask)
    pos_mean = masked_seq_mean(delta.clamp(min=0), mask)
    if isinstance(branch, str):
        _check_branch(branch)
        return abs_mean if branch == "general" else pos_mean
    if len(branch) != delta.shape[0]:
        raise ValueError(f"got {len(branch)} branches for a batch of {delta.shape[0]}")
    for b in branch:
        _check_branch(b)
    is_general = torch.tensor([b == "general" for b in branch], dtype=torch.bool, device=delta.device)
    return torch.where(is_general, abs_mean, pos_mean)


def _check_branch(branch: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f"branch: expected one of {BRANCHES}, got {branch!r}")


@dataclass
class SelectionResult:
    """Outcome of :func:`mass_target_select`.

    keep: bool ``[N]`` selected samples; order: long ``[n_valid]`` valid indices by descending score (stable);
    k: number kept; n_nan: non-finite scores dropped; all_zero: every valid score was 0 (all kept).
    """

    keep: Tensor
    order: Tensor
    k: int
    n_nan: int
    all_zero: bool


def mass_target_select(scores: Tensor, rho: float) -> SelectionResult:
    """Keep the smallest prefix of samples (by descending score) whose score mass is ``>= rho`` of the total.

    Edge cases: non-finite scores are dropped and counted; ties keep their input order (stable sort); if every
    valid score is 0 there is no mass to target, so all valid samples are kept and ``all_zero`` is set; a single
    valid sample is always kept. Scores must be ``>= 0``.
    """
    if not 0.0 < rho <= 1.0:
        raise SpecError(f"rho: expected 0 < rho <= 1, got {rho}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    s = scores.detach().to(torch.float64)
    valid = torch.isfinite(s)
    if bool((s[valid] < 0).any()):
        raise ValueError("scores must be non-negative")
    n_nan = int((~valid).sum())
    keep = torch.zeros_like(valid)
    valid_idx = torch.nonzero(valid).flatten()
    if valid_idx.numel() == 0:
        return SelectionResult(keep, valid_idx, 0, n_nan, False)
    sorted_s, perm = torch.sort(s[valid_idx], descending=True, stable=True)
    order = valid_idx[perm]
    cum = torch.cumsum(sorted_s, dim=0)
    total = cum[-1]
    if total <= 0:
        keep[valid_idx] = True
        return SelectionResult(keep, order, int(valid_idx.numel()), n_nan, True)
    k = int(torch.searchsorted(cum, rho * total, side="left")) + 1
    k = min(k, int(order.numel()))
    keep[order[:k]] = True
    return SelectionResult(keep, order, k, n_nan, False)


def branch_scale(branch: str, r_g: float = 2.0, r_d: float = 1.0) -> float:
    """Advantage scale ``r_b`` of a branch (defaults ``r_g = 2``, ``r_d = 1``)."""
    _check_branch(branch)
    return r_g if branch == "general" else r_d
