"""Per-token helpers on padded ``[B, T]`` response tensors.

Every algorithm in ``algo/`` works on right-padded response tensors plus a ``mask`` (1 = response token,
0 = padding). These helpers centralise the masking so that padded positions can never leak into a gap, a mean
or a loss: masked positions are replaced (not multiplied) so that even NaN/inf padding values are harmless.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool_mask(mask: Tensor) -> Tensor:
    """Return ``mask`` as a boolean tensor (accepts bool, int or float 0/1 masks)."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with every masked-out position set to 0 (NaN/inf there are removed too, gradients stay zero)."""
    return torch.where(as_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def seq_lengths(mask: Tensor) -> Tensor:
    """Number of response tokens per sequence ``T_i`` as a long ``[B]`` tensor."""
    return as_bool_mask(mask).sum(dim=-1)


def masked_seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence sum of ``x`` over response tokens, ``[B]``."""
    return masked_fill_zero(x, mask).sum(dim=-1)


def masked_seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence token mean ``(1/T_i) sum_t x_t`` over response tokens, ``[B]``; 0 for empty rows."""
    lengths = seq_lengths(mask).to(x.dtype if x.is_floating_point() else torch.float32)
    return masked_seq_sum(x, mask) / lengths.clamp(min=1)


def token_gaps(teacher_lp: Tensor, student_lp: Tensor, mask: Tensor) -> Tensor:
    """Token gap ``delta_t = log pi_T(y_t|h_t) - log pi_s(y_t|h_t)``, zero on padding, ``[B, T]``.

    NaN on a response token is kept (callers detect it with :func:`nonfinite_rows` and drop the sample).
    """
    if teacher_lp.shape != student_lp.shape or teacher_lp.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: teacher_lp {tuple(teacher_lp.shape)}, student_lp {tuple(student_lp.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    return masked_fill_zero(teacher_lp - student_lp, mask)


def nonfinite_rows(mask: Tensor, *tensors: Tensor | None) -> Tensor:
    """Boolean ``[B]``: True where a given ``[B, T, ...]`` tensor is NaN/inf on a response token (or a ``[B]``
    tensor is NaN/inf for that sample)."""
    m = as_bool_mask(mask)
    bad = torch.zeros(m.shape[0], dtype=torch.bool, device=m.device)
    for t in tensors:
        if t is None:
            continue
        nf = ~torch.isfinite(t)
        if nf.dim() == 1:
            bad |= nf
            continue
        while nf.dim() > m.dim():
            nf = nf.any(dim=-1)
        bad |= (nf & m).any(dim=-1)
    return bad
