"""Training/inference importance-sampling weights ``w_t`` (the truncated IS weight of MOPD §3.2 and arXiv:2605.27115
Eq. (2)).

The rollout engine ``mu`` and the training engine ``pi_s`` compute slightly different probabilities for the same
tokens; the MiMo-V2-Flash form (cited by CaMOPD Eq. 2) reweights each token by ``ratio_t = pi_s / mu`` and masks
tokens whose ratio leaves ``[eps_low, eps_high]``; truncated IS caps the ratio at ``C`` instead. Weights are
always detached (``sg[.]``) and are 0 on padding.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from megatron_camopd.algo.tokens import as_bool_mask
from megatron_camopd.errors import SpecError

ISMode = Literal["mask", "truncate", "none"]
IS_MODES: tuple[str, ...] = ("mask", "truncate", "none")


def validate_is_params(mode: str, eps_low: float, eps_high: float, cap: float) -> None:
    """Raise :class:`SpecError` naming the field when an IS parameter is out of range."""
    if mode not in IS_MODES:
        raise SpecError(f"is_weight: expected one of {IS_MODES}, got {mode!r}")
    if not 0.0 <= eps_low <= 1.0:
        raise SpecError(f"eps_low: expected 0 <= eps_low <= 1, got {eps_low}")
    if not eps_high >= 1.0:
        raise SpecError(f"eps_high: expected eps_high >= 1, got {eps_high}")
    if not cap > 0.0:
        raise SpecError(f"is_cap: expected cap > 0, got {cap}")


def is_weights(
    train_lp: Tensor,
    rollout_lp: Tensor | None,
    mask: Tensor,
    mode: ISMode | str = "mask",
    eps_low: float = 0.5,
    eps_high: float = 5.0,
    cap: float = 2.0,
) -> Tensor:
    """Detached per-token IS weights ``[B, T]``.

    ``mode="mask"``: ``w = ratio`` if ``eps_low <= ratio <= eps_high`` else 0.
    ``mode="truncate"``: ``w = min(ratio, cap)``.
    ``mode="none"`` or ``rollout_lp is None``: ``w = 1``.
    Padding positions get 0; a non-finite ratio on a response token gets 0 (never NaN).
    """
    validate_is_params(mode, eps_low, eps_high, cap)
    m = as_bool_mask(mask)
    train_lp = train_lp.detach()
    if rollout_lp is None or mode == "none":
        return m.to(train_lp.dtype)
    ratio = torch.exp(train_lp - rollout_lp.detach())
    finite = torch.isfinite(ratio)
    if mode == "mask":
        keep = (ratio >= eps_low) & (ratio <= eps_high)
        w = torch.where(keep, ratio, torch.zeros_like(ratio))
    else:
        w = torch.clamp(ratio, max=cap)
    return torch.where(m & finite, w, torch.zeros_like(w))
