"""The paper's gradient diagnostics, computed with the real Megatron model at the current parameters.

- cross-branch `<g_g, g_d>`, cosine, norm ratio `||g_d|| / ||g_g||`, counteracted fraction `-<g_g, g_d> /
  ||g_g||^2` and their per-tensor breakdown (`algo.diagnostics.TENSOR_GROUPS`): the gradient of each branch's
  loss on its latest batch, both taken at the same (current) parameters before the update. Each branch gradient
  is built from two random halves of its batch (`split_branch_grad`), whose cosine is the branch's split-half
  reliability: the noise floor that the attenuation-corrected cross-branch cosine takes out. In alternating mode
  the other branch's latest batch (and its signals) is cached from the step that trained on it.
- within-branch coherence from the Gram matrix of per-sample gradients (`per_sample_gram`): `Coh(A)` of any
  subset, so GCG of the selected subset is read against random subsets of the same size (algo/diagnostics.py).

Each per-sample gradient is one extra forward/backward of one row (opt-in: `logging.diagnostics`). Every DP rank
runs the same number of passes (`dp_max`: the callers pad with zero-weight batches), since FP8's delayed scaling
all-reduces amaxes over TP x DP at each forward. The Gram matrix spans every DP rank's samples (the per-sample rows
are gathered over DP); branch gradients are summed over DP; flat dot products and norms are summed over the
model-parallel group counting tensor-parallel-duplicated parameters once.

Memory bound (N = this rank's counted gradient entries, i.e. its parameters less TP duplicates): beyond the
model's own fp32 DDP grad buffers, cross-branch diagnostics hold at most 3 fp32 vectors of N entries (one branch
gradient while the other's two halves are built); the Gram matrix holds one fp32 row per per-sample gradient,
exact when N <= `logging.diagnostics_sketch_dim`, else a CountSketch of that width (dp_size x samples x width x 4
bytes after the DP gather); temporaries are at most CHUNK entries in fp64 (16 MiB x 8 B x 2 = 256 MiB). Norms are
streamed from the grad buffers per parameter and piece; no fp64 copy of a gradient is ever made.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_camopd.algo.diagnostics import TENSOR_GROUPS, tensor_group
from megatron_camopd.backend.forward import comm_device

CHUNK = 1 << 24  # entries per piece of a streamed reduction


def _counting_finalize(counts: list):
    """A finalize that does no DP all-reduce and no scaling; it records the step's count (from the last stage)."""

    def finalize(model, num_tokens=None, **kwargs):
        if num_tokens is not None and ps.get_pipeline_model_parallel_world_size() > 1:
            num_tokens = num_tokens.clone()
            dist.broadcast(
                num_tokens, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
        counts.append(int(num_tokens) if num_tokens is not None else 0)

    return finalize


def _counted_named(engine) -> list[tuple[str, torch.Tensor]]:
    """This rank's counted gradients with their parameter names (views of the DDP fp32 `main_grad` buffers, never
    copies): TP duplicates and tied copies outside the first pipeline stage are left out, so sums over the
    model-parallel group count each entry once."""
    out = []
    for chunk in engine.chunks:
        for name, p in chunk.named_parameters():
            g = getattr(p, "main_grad", None)
            if g is None or not param_is_not_tensor_parallel_duplicate(p):
                continue
            if getattr(p, "shared_embedding", False) and not ps.is_pipeline_first_stage(ignore_virtual=True):
                continue
            out.append((name, g.detach().reshape(-1)))
    return out


def _counted(engine) -> list[torch.Tensor]:
    return [g for _, g in _counted_named(engine)]


def _pieces(v: torch.Tensor):
    """Views of at most CHUNK entries (bounds the temporaries of one reduction)."""
    for i in range(0, v.numel(), CHUNK):
        yield v[i : i + CHUNK]


def _sumsq(vectors) -> torch.Tensor:
    """Sum of squares of the given vectors, accumulated in fp64 piece by piece (temporaries <= CHUNK entries)."""
    total = torch.zeros((), dtype=torch.float64, device=comm_device())
    for v in vectors:
        for piece in _pieces(v):
            total += torch.linalg.vector_norm(piece, dtype=torch.float64).square()
    return total


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=comm_device())
    for x, y in zip(_pieces(a), _pieces(b)):
        total += torch.dot(x.double(), y.double())
    return total


def flat_grad(engine, out: torch.Tensor | None = None, *, add: bool = False, alpha: float = 1.0) -> torch.Tensor:
    """This rank's counted gradient times `alpha` as one fp32 vector: written into (or, `add`, accumulated onto)
    `out`, streamed per parameter -- the only full-size tensor is `out` itself (allocated when None)."""
    grads = _counted(engine)
    n = sum(g.numel() for g in grads)
    if out is None:
        out = torch.zeros(n, dtype=torch.float32, device=comm_device())
    elif out.numel() != n:
        raise ValueError(f"gradient accumulator of {out.numel()} entries for a {n}-entry gradient")
    offset = 0
    for g in grads:
        dst = out[offset : offset + g.numel()]
        if add:
            dst.add_(g, alpha=alpha)
        else:
            dst.copy_(g)
            if alpha != 1.0:
                dst.mul_(alpha)
        offset += g.numel()
    return out


def _mp_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double().to(comm_device())
    dist.all_reduce(x, group=ps.get_model_parallel_group())
    return x


def dp_max(n: int) -> int:
    """The largest `n` over the data-parallel group (collective): how many passes every DP rank runs, so that
    no rank leaves the others waiting in a per-forward collective (FP8 amax reduction over TP x DP)."""
    t = torch.tensor([float(n)], dtype=torch.double, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return int(t.item())


def branch_grad(
    engine, batch, loss_spec, *, over_dp: bool = False, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """(gradient of the mean selected-sequence loss, number of selected sequences) at the current parameters.

    `over_dp=False`: this rank's rows only. `over_dp=True`: every DP rank passes its slice and gets the gradient
    of the whole batch (collective over DP). The gradient is one fp32 vector (`out` when given), scaled in place.
    """
    counts: list[int] = []
    with engine.local_grads():
        engine.accumulate_grads(batch, loss_spec, finalize=_counting_finalize(counts), reduce=False)
    g = flat_grad(engine, out)
    n = torch.tensor([float(counts[0]) if counts else 0.0], device=comm_device())
    if over_dp:
        dist.all_reduce(g, group=ps.get_data_parallel_group())
        dist.all_reduce(n, group=ps.get_data_parallel_group())
    count = int(n.item())
    if count:
        g.div_(count)
    return g, count


def dot_cosine(engine, g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    """Global dot product and cosine of two flat gradients (summed over the model-parallel group)."""
    dot, n1, n2 = _mp_sum(torch.stack([_dot(g1, g2), _sumsq([g1]), _sumsq([g2])])).tolist()
    denom = (n1**0.5) * (n2**0.5)
    return dot, (dot / denom if denom > 0 else float("nan"))


def split_branch_grad(engine, half_a, half_b, loss_spec) -> tuple[torch.Tensor, int, float]:
    """A branch's gradient over its whole batch (over DP), built from two halves of it: (gradient of the mean
    selected-sequence loss, selected sequences, cosine of the two halves' gradients = the split-half
    correlation; nan when a half has no selected sequence). Holds the two halves, then keeps one vector."""
    g, n_a = branch_grad(engine, half_a, loss_spec, over_dp=True)
    g_b, n_b = branch_grad(engine, half_b, loss_spec, over_dp=True)
    r = dot_cosine(engine, g, g_b)[1] if n_a and n_b else math.nan
    n = n_a + n_b
    if n:
        g.mul_(n_a / n).add_(g_b, alpha=n_b / n)
    del g_b
    return g, n, r


def squared_norm(engine, g: torch.Tensor) -> float:
    """``||g||^2`` over the model-parallel group."""
    return float(_mp_sum(_sumsq([g])))


def grouped_dots(engine, g1: torch.Tensor, g2: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """Per parameter role (TENSOR_GROUPS): (<g1, g2>, ||g1||^2, ||g2||^2) over that role's tensors, summed over
    the model-parallel group (the same fixed vector of roles on every rank)."""
    acc = torch.zeros(len(TENSOR_GROUPS), 3, dtype=torch.float64, device=comm_device())
    offset = 0
    for name, g in _counted_named(engine):
        k = TENSOR_GROUPS.index(tensor_group(name))
        a, b = g1[offset : offset + g.numel()], g2[offset : offset + g.numel()]
        acc[k, 0] += _dot(a, b)
        acc[k, 1] += _sumsq([a])
        acc[k, 2] += _sumsq([b])
        offset += g.numel()
    acc = _mp_sum(acc)
    return {grp: (float(acc[k, 0]), float(acc[k, 1]), float(acc[k, 2])) for k, grp in enumerate(TENSOR_GROUPS)}


def dp_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over the DP group."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def _sketch_into(grads: list[torch.Tensor], out: torch.Tensor, alpha: float, seed: int) -> None:
    """Add the CountSketch of the concatenated `grads` times `alpha` onto `out` (width m): entry j goes to bucket
    h(j) with sign s(j), both drawn from a generator seeded per (seed, model-parallel rank, tensor, piece), so every
    per-sample gradient is sketched with the same hash and `<sketch(a), sketch(b)>` estimates `<a, b>` without bias
    (error ~ ||a|| ||b|| / sqrt(m))."""
    m = out.numel()
    mp = ps.get_model_parallel_group()
    rank = dist.get_rank(mp)
    for t, g in enumerate(grads):
        for p, piece in enumerate(_pieces(g)):
            gen = torch.Generator(device=piece.device).manual_seed((seed * 1_000_003 + rank * 10_007 + t) * 100_003 + p)
            h = torch.randint(0, m, (piece.numel(),), generator=gen, device=piece.device)
            sign = torch.randint(0, 2, (piece.numel(),), generator=gen, device=piece.device).to(piece.dtype)
            out.index_add_(0, h, piece * (sign * 2 - 1), alpha=alpha)


def per_sample_gram(
    engine, per_sample_batches: list, labels: list[list[bool]], loss_spec, *, sketch_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gram matrix ``K_ij = <g_i, g_j>`` in fp64, labels) over the per-sample gradients of every DP rank.

    `per_sample_batches` are this rank's one-row batches, as many on every DP rank (a rank with fewer samples
    pads with zero-weight batches, which run and are left out), `labels` one list of booleans per batch (e.g.
    selected, carries the conflict). Each gradient is written into one fp32 row (exact, or its CountSketch when
    this rank's gradient has more than `sketch_dim` entries); the rows and labels are gathered over DP (the
    padding is dropped) and the Gram matrix is summed over the model-parallel group. Samples
    without a counted sequence are left out. Returns K [M, M] and the labels [M, L] (bool) of the M samples."""
    grads = _counted(engine)
    n_local = sum(g.numel() for g in grads)
    exact = n_local <= sketch_dim
    width = n_local if exact else sketch_dim
    n_lab = len(labels[0]) if labels else 0
    dp = ps.get_data_parallel_group()
    sizes = torch.tensor([float(len(per_sample_batches)), float(n_lab)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=dp)
    rows_max, n_lab = int(sizes[0]), int(sizes[1])
    rows = torch.zeros(rows_max, width, dtype=torch.float32, device=comm_device())
    meta = torch.zeros(rows_max, 1 + n_lab, dtype=torch.float64, device=comm_device())  # [present, labels...]
    for j, (batch, lab) in enumerate(zip(per_sample_batches, labels)):
        counts: list[int] = []
        with engine.local_grads():
            engine.accumulate_grads(
                batch, loss_spec, finalize=_counting_finalize(counts), reduce=False, micro_batch_size=1
            )
        count = counts[0] if counts else 0
        if not count:
            continue
        if exact:
            flat_grad(engine, rows[j], alpha=1.0 / count)
        else:
            _sketch_into(grads, rows[j], 1.0 / count, seed)
        meta[j, 0] = 1.0
        meta[j, 1:] = torch.tensor([float(x) for x in lab], dtype=torch.float64)
    world = dist.get_world_size(dp)
    if world > 1:
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        all_meta = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(all_rows, rows, group=dp)
        dist.all_gather(all_meta, meta, group=dp)
        rows, meta = torch.cat(all_rows), torch.cat(all_meta)
    present = meta[:, 0] > 0
    rows, meta = rows[present], meta[present]
    m = rows.shape[0]
    k = torch.zeros(m, m, dtype=torch.float64, device=comm_device())
    step = max(1, CHUNK // max(m, 1))
    for a in range(0, width, step):
        block = rows[:, a : a + step].double()
        k += block @ block.T
    return _mp_sum(k), meta[:, 1:] > 0


def cross_branch(engine, halves: dict[str, tuple], loss_spec) -> dict[str, float]:
    """The cross-branch instruments from each branch's two half batches (`{"general": (a, b), "domain": (a, b)}`,
    every DP rank passing its slice): per branch the split-half cosine and reliability, then the dot product,
    cosine, norm ratio, counteracted fraction, the attenuation-corrected cosine and the per-tensor breakdown
    (algo/diagnostics.py). At most 3 gradient vectors are alive at once."""
    from megatron_camopd.algo.diagnostics import (
        corrected_cosine,
        cross_branch_stats,
        grouped_cross_stats,
        spearman_brown,
    )

    grads, counts, out = {}, {}, {}
    for b in ("general", "domain"):
        half_a, half_b = halves[b]
        grads[b], counts[b], r = split_branch_grad(engine, half_a, half_b, loss_spec)
        out[f"split_cos/{b}"] = r
        out[f"reliability/{b}"] = spearman_brown(r) if not math.isnan(r) else math.nan
    if not (counts["general"] and counts["domain"]):
        return out
    g_g, g_d = grads["general"], grads["domain"]
    dot, sq_g, sq_d = _mp_sum(torch.stack([_dot(g_g, g_d), _sumsq([g_g]), _sumsq([g_d])])).tolist()
    out.update(cross_branch_stats(dot, sq_g, sq_d))
    out["grad_norm/general"], out["grad_norm/domain"] = math.sqrt(sq_g), math.sqrt(sq_d)
    out["grad_cos_corrected"] = corrected_cosine(out["grad_cos"], out["reliability/general"], out["reliability/domain"])
    out.update({f"cross/{k}": v for k, v in grouped_cross_stats(grouped_dots(engine, g_g, g_d)).items()})
    return out
