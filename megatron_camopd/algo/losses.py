"""Per-sequence distillation losses (MOPD §3.2; arXiv:2605.27115 Eqs. (2), (9)) and the selected-sequence reduction
used in Megatron.

Every loss here returns one value per sequence, the token mean over that sequence's response tokens, so that a
sequence's weight in the final mean does not depend on its length. ``reduce_selected`` then sums the selected
sequences and counts them: Megatron's ``calculate_per_token_loss=True`` divides the global sum by the global count,
which yields the spec's "mean over selected sequences" independent of micro-batching, DP and PP.
All masked positions are replaced by zeros *before* any arithmetic, so padding values (even NaN) change neither the
loss nor the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_camopd.algo.tokens import as_bool_mask, masked_fill_zero, seq_lengths
from megatron_camopd.errors import SpecError


def clip_advantage(delta: Tensor, a_max: float | None = 5.0) -> Tensor:
    """Detached two-sided clip ``sg[clip(delta, -a_max, a_max)]``; ``a_max=None`` means no clip."""
    if a_max is None:
        return delta.detach()
    if not a_max > 0:
        raise SpecError(f"a_max: expected a positive number or null, got {a_max}")
    return delta.detach().clamp(min=-a_max, max=a_max)


def pg_seq_loss(
    train_lp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    is_w: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> Tensor:
    """Per-sequence policy-gradient loss ``-(1/T_i) sum_t w_t * tw_t * A_t * log pi_s(y_t|h_t)``, ``[B]``.

    ``T_i`` is the number of response (mask) tokens, NOT the sum of ``token_weight``: a token weight of 0 (e.g.
    SelecTKD rejection, entropy masking) removes the token's contribution but keeps the sequence's normalisation,
    so down-weighting tokens never inflates the remaining tokens' gradients. Advantages, IS weights and token
    weights are treated as constants (detached). Empty rows give 0.
    """
    m = as_bool_mask(mask)
    coef = masked_fill_zero(advantages.detach(), m)
    if is_w is not None:
        coef = coef * masked_fill_zero(is_w.detach(), m)
    if token_weight is not None:
        coef = coef * masked_fill_zero(token_weight.detach(), m)
    lp = masked_fill_zero(train_lp, m)
    lengths = seq_lengths(m).clamp(min=1).to(lp.dtype)
    return -(coef * lp).sum(dim=-1) / lengths


def topk_seq_loss(
    student_topk_lp: Tensor,
    teacher_topk_lp: Tensor,
    mask: Tensor,
    with_correction: bool = True,
) -> Tensor:
    """Per-sequence top-k reverse-KL loss, ``[B]``.

    Token term: ``sum_{v in K_t} p_s(v) log(p_s(v)/p_T(v)) - p_s(v) + p_T(v)`` (the last two summands only with
    ``with_correction``), averaged over the sequence's response tokens. With the correction the gradient w.r.t.
    ``log p_s(v)`` is ``p_s(v)(log p_s(v) - log p_T(v))``, zero exactly at ``p_s = p_T`` on ``K_t``; without it
    there is a spurious ``+p_s(v)`` that pushes the top-k mass down. Teacher log-probs are detached.
    """
    if student_topk_lp.shape != teacher_topk_lp.shape or student_topk_lp.shape[:2] != mask.shape:
        raise ValueError(
            f"shape mismatch: student_topk_lp {tuple(student_topk_lp.shape)}, teacher_topk_lp "
            f"{tuple(teacher_topk_lp.shape)}, mask {tuple(mask.shape)}"
        )
    m = as_bool_mask(mask).unsqueeze(-1).expand_as(student_topk_lp)
    s_lp = masked_fill_zero(student_topk_lp, m)
    t_lp = masked_fill_zero(teacher_topk_lp.detach(), m)
    p_s = torch.exp(s_lp)
    term = p_s * (s_lp - t_lp)
    if with_correction:
        term = term - p_s + torch.exp(t_lp)
    term = masked_fill_zero(term, m)  # exp(0) = 1 on padding would otherwise leak into the correction
    lengths = seq_lengths(mask).clamp(min=1).to(term.dtype)
    return term.sum(dim=(-1, -2)) / lengths


def reduce_selected(seq_loss: Tensor, sample_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss_sum, count)``: ``sum_i sw_i * L_i`` over selected sequences (``sw_i > 0``) and their number.

    ``count`` is an int tensor (Megatron accumulates it in an int counter). Dropped sequences contribute exactly
    nothing, not even NaN. ``mean = loss_sum / count`` (0 selected -> ``loss_sum = 0``, ``count = 0``).
    """
    if seq_loss.shape != sample_weight.shape:
        raise ValueError(
            f"shape mismatch: seq_loss {tuple(seq_loss.shape)}, sample_weight {tuple(sample_weight.shape)}"
        )
    sel = sample_weight > 0
    contrib = torch.where(sel, seq_loss * sample_weight.detach().to(seq_loss.dtype), torch.zeros_like(seq_loss))
    return contrib.sum(), sel.sum().to(torch.int)
