"""The distillation losses as megatron-core loss functions.

`make_loss_func(spec, tp_group)` returns `loss_func(microbatch, output_tensor) -> (loss_sum, count, report)`:
`loss_sum` is the sum over the micro-batch's selected sequences of their per-sequence token-mean loss and
`count` their number. With `calculate_per_token_loss=True` megatron-core divides the accumulated gradient by the
global count (all micro-batches, all DP ranks), so a step optimises the spec's "mean over selected sequences"
whatever the micro-batching, DP or PP layout.

All tensors of a micro-batch are aligned with the model's next-token positions: column j holds the signal for
the label `labels[:, j] = tokens[:, j + 1]`, and `loss_mask[:, j] = 1` iff that label is a response token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_camopd.algo.losses import pg_seq_loss, reduce_selected, topk_seq_loss
from megatron_camopd.algo.tokens import masked_seq_mean
from megatron_camopd.algo.weights import is_weights
from megatron_camopd.backend.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_logprobs_at


@dataclass(frozen=True)
class LossSpec:
    """Which loss a step optimises and the importance-weight settings of the policy-gradient form."""

    loss: str = "pg"  # "pg" | "topk" | "sft"
    is_weight: str = "mask"  # "mask" | "truncate" | "none"
    eps_low: float = 0.5
    eps_high: float = 5.0
    is_cap: float = 2.0
    chunk_size: int = 1024
    topk_correction: bool = True
    vocab_size: int | None = None  # true (unpadded) vocabulary: Megatron's padding ids are excluded


def _loss(spec: LossSpec, tp_group, mb: dict[str, torch.Tensor], output_tensor: torch.Tensor):
    mask = mb["loss_mask"]
    sample_weight = mb["sample_weight"]
    if spec.loss == "topk":
        student_topk = vocab_parallel_logprobs_at(
            output_tensor, mb["topk_ids"], tp_group, chunk_size=spec.chunk_size, vocab_size=spec.vocab_size
        )
        seq = topk_seq_loss(student_topk, mb["topk_lp"], mask, with_correction=spec.topk_correction)
        if "seq_scale" in mb:
            seq = seq * mb["seq_scale"]
        lp = None
    else:
        lp = vocab_parallel_logprobs(
            output_tensor, mb["labels"], tp_group, chunk_size=spec.chunk_size, vocab_size=spec.vocab_size
        )
        if spec.loss == "sft":
            seq = masked_seq_mean(-lp, mask)
        else:
            w = is_weights(
                lp.detach(),
                mb.get("rollout_lp"),
                mask,
                mode=spec.is_weight,
                eps_low=spec.eps_low,
                eps_high=spec.eps_high,
                cap=spec.is_cap,
            )
            seq = pg_seq_loss(lp, mb["advantages"], mask, is_w=w, token_weight=mb.get("token_weight"))
    loss_sum, count = reduce_selected(seq, sample_weight)
    report = {
        "loss_sum": loss_sum.detach().clone().float().reshape(1),
        "count": torch.as_tensor(count, dtype=torch.float).reshape(1),
    }
    if lp is not None and "rollout_lp" in mb:
        diff = (lp.detach() - mb["rollout_lp"]) * mask
        report["train_rollout_lp_absdiff_sum"] = diff.abs().sum().reshape(1)
        report["tokens"] = mask.sum().reshape(1)
    return loss_sum, torch.as_tensor(count, dtype=torch.int).reshape(()), report


def make_loss_func(spec: LossSpec, tp_group):
    """Bind the loss kind and TP group: the result takes `(microbatch, output_tensor)`."""
    return partial(_loss, spec, tp_group)
