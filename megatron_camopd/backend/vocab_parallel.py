"""Log-probabilities, entropy, top-k and sampling over a tensor-parallel-sharded vocabulary.

Input layout: ``logits_shard [..., V_local]`` with any leading dims (GPTModel with ``parallel_output=True``
returns ``[B, S, V_padded / tp]`` in megatron-core 0.16), where TP rank ``r`` holds the global vocabulary ids
``[r * V_local, (r + 1) * V_local)``. ``tp_group=None`` means no tensor parallelism (the shard is the whole
vocabulary). ``vocab_size`` is the TRUE vocabulary size: padded ids ``>= vocab_size`` are excluded (-inf logit),
so the results equal a ``log_softmax`` over the unpadded HF vocabulary.

Nothing gathers the full vocabulary: each rank reduces its shard and exchanges per-row scalars (max, sum of
exponentials, values at requested ids) or ``k`` candidates per rank. The leading dims are flattened to rows and
processed ``chunk_size`` rows at a time, so fp32 work memory is ``chunk_size * V_local`` floats, never an fp32
copy of all logits. Results are fp32. ``vocab_parallel_logprobs`` / ``vocab_parallel_logprobs_at`` are
differentiable (custom autograd: the gradient w.r.t. this rank's shard needs no communication, given an upstream
gradient that is identical on all TP ranks, as in Megatron).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

DEFAULT_CHUNK = 1024


def _tp(group: Any) -> tuple[int, int]:
    """(rank, size) in the TP group; (0, 1) without one."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, group: Any, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    if _tp(group)[1] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _masked_fp32(chunk: torch.Tensor, offset: int, vocab_size: int | None) -> torch.Tensor:
    """fp32 copy of a row chunk with padded vocabulary columns set to -inf."""
    x = chunk.float()  # no copy for fp32 input: never modify x in place here
    if vocab_size is not None and offset + x.shape[-1] > vocab_size:
        padded = torch.arange(x.shape[-1], device=x.device) >= max(vocab_size - offset, 0)
        x = x.masked_fill(padded, float("-inf"))
    return x


def _logsumexp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Row-wise log-sum-exp over the full (sharded) vocabulary; x is an fp32 row chunk [n, V_local]."""
    m = _all_reduce(x.max(dim=-1).values, group, dist.ReduceOp.MAX)
    s = _all_reduce(torch.exp(x - m.unsqueeze(-1)).sum(dim=-1), group)
    return m + torch.log(s)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _LogprobsAt(torch.autograd.Function):
    """log p(ids) for ids [N, K] given logits rows [N, V_local] sharded over the TP group."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, ids: torch.Tensor, group: Any, chunk: int, vocab_size: int | None
    ) -> torch.Tensor:
        rank, _ = _tp(group)
        v_local = logits.shape[-1]
        offset = rank * v_local
        out = torch.empty(ids.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty(ids.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            sl = slice(start, start + chunk)
            x = _masked_fp32(logits[sl], offset, vocab_size)
            lse[sl] = _logsumexp(x, group)
            local = ids[sl] - offset
            inside = (local >= 0) & (local < v_local)
            picked = torch.where(inside, x.gather(-1, local.clamp(0, v_local - 1)), torch.zeros((), device=x.device))
            out[sl] = _all_reduce(picked, group)
        out -= lse.unsqueeze(-1)
        ctx.save_for_backward(logits, ids, lse)
        ctx.group, ctx.chunk, ctx.vocab_size = group, chunk, vocab_size
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        logits, ids, lse = ctx.saved_tensors
        rank, _ = _tp(ctx.group)
        v_local = logits.shape[-1]
        offset = rank * v_local
        grad = torch.empty_like(logits)
        grad_out = grad_out.float()
        for start in range(0, logits.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            x = _masked_fp32(logits[sl], offset, ctx.vocab_size)
            g = grad_out[sl]
            local = ids[sl] - offset
            inside = (local >= 0) & (local < v_local)
            chunk_grad = -g.sum(dim=-1, keepdim=True) * torch.exp(x - lse[sl].unsqueeze(-1))
            chunk_grad.scatter_add_(-1, local.clamp(0, v_local - 1), torch.where(inside, g, torch.zeros_like(g)))
            grad[sl] = chunk_grad.to(grad.dtype)
        return grad, None, None, None, None


def vocab_parallel_logprobs_at(
    logits_shard: torch.Tensor,
    ids: torch.Tensor,
    tp_group: Any = None,
    chunk_size: int = DEFAULT_CHUNK,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """fp32 log p(v) at global ids ``ids [..., K]`` (same leading dims as the logits); differentiable."""
    lead = logits_shard.shape[:-1]
    if tuple(ids.shape[:-1]) != tuple(lead):
        raise ValueError(f"ids leading dims {tuple(ids.shape[:-1])} do not match logits {tuple(lead)}")
    k = ids.shape[-1]
    out = _LogprobsAt.apply(_rows(logits_shard), ids.reshape(-1, k).long(), tp_group, chunk_size, vocab_size)
    return out.reshape(*lead, k)


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group: Any = None,
    chunk_size: int = DEFAULT_CHUNK,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """fp32 log p(target) with ``target_ids`` shaped like the logits' leading dims; differentiable."""
    return vocab_parallel_logprobs_at(logits_shard, target_ids.unsqueeze(-1), tp_group, chunk_size, vocab_size)[..., 0]


@torch.no_grad()
def vocab_parallel_entropy(
    logits_shard: torch.Tensor,
    tp_group: Any = None,
    chunk_size: int = DEFAULT_CHUNK,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """fp32 entropy ``-sum_v p(v) log p(v)`` per position (leading dims of the logits); no gradient."""
    rank, _ = _tp(tp_group)
    rows = _rows(logits_shard)
    offset = rank * rows.shape[-1]
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        x = _masked_fp32(rows[sl], offset, vocab_size)
        m = _all_reduce(x.max(dim=-1).values, tp_group, dist.ReduceOp.MAX)
        e = torch.exp(x - m.unsqueeze(-1))
        stats = torch.stack([e.sum(-1), (e * torch.where(e > 0, x, torch.zeros_like(x))).sum(-1)], dim=-1)
        stats = _all_reduce(stats, tp_group)
        z, ex = stats[:, 0], stats[:, 1] / stats[:, 0]
        out[sl] = m + torch.log(z) - ex
    return out.reshape(logits_shard.shape[:-1])


def _global_topk(x: torch.Tensor, k: int, offset: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, global ids) of fp32 rows [n, V_local] over the sharded vocabulary, sorted descending."""
    _, size = _tp(group)
    k_local = min(k, x.shape[-1])
    vals, idx = torch.topk(x, k_local, dim=-1)
    idx = idx + offset
    if size > 1:
        all_vals = [torch.empty_like(vals) for _ in range(size)]
        all_idx = [torch.empty_like(idx) for _ in range(size)]
        dist.all_gather(all_vals, vals.contiguous(), group=group)
        dist.all_gather(all_idx, idx.contiguous(), group=group)
        vals, idx = torch.cat(all_vals, dim=-1), torch.cat(all_idx, dim=-1)
    top_vals, pos = torch.topk(vals, min(k, vals.shape[-1]), dim=-1)
    return top_vals, idx.gather(-1, pos)


@torch.no_grad()
def vocab_parallel_topk(
    logits_shard: torch.Tensor,
    k: int,
    tp_group: Any = None,
    chunk_size: int = DEFAULT_CHUNK,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 top-k log-probs [..., k] sorted descending, their global ids [..., k] int64); no gradient.

    Each rank takes its local top-k and all-gathers ``k`` candidates; identical on all TP ranks.
    """
    rank, _ = _tp(tp_group)
    rows = _rows(logits_shard)
    offset = rank * rows.shape[-1]
    vals_out, ids_out = [], []
    for start in range(0, rows.shape[0], chunk_size):
        x = _masked_fp32(rows[start : start + chunk_size], offset, vocab_size)
        lse = _logsumexp(x, tp_group)
        vals, ids = _global_topk(x, k, offset, tp_group)
        vals_out.append(vals - lse.unsqueeze(-1))
        ids_out.append(ids)
    lead = logits_shard.shape[:-1]
    return torch.cat(vals_out).reshape(*lead, -1), torch.cat(ids_out).reshape(*lead, -1)


@torch.no_grad()
def vocab_parallel_argmax(
    logits_shard: torch.Tensor,
    tp_group: Any = None,
    chunk_size: int = DEFAULT_CHUNK,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Global argmax id per position (int64, leading dims of the logits), identical on all TP ranks."""
    return vocab_parallel_topk(logits_shard, 1, tp_group, chunk_size, vocab_size)[1][..., 0]
