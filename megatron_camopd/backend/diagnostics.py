"""The paper's gradient diagnostics, computed with the real Megatron model at the current parameters.

- cross-branch `<g_g, g_d>` and cosine: the gradient of each branch's loss on its latest batch, both taken at the
  same (current) parameters before the update. In alternating mode the other branch's latest batch (and its
  signals) is cached from the step that trained on it.
- within-branch coherence `Coh(A) = ||sum_i g_i|| / sum_i ||g_i||` over per-sample gradients, for the full
  candidate batch and the selected subset, and `GCG = (Coh(sel) - Coh(full)) / Coh(full) * 100`.

Each per-sample gradient is one extra forward/backward (opt-in: `logging.diagnostics`). Every DP rank runs the
same number of passes (`dp_max`: the callers pad with zero-weight batches), since FP8's delayed scaling
all-reduces amaxes over TP x DP at each forward. Per-sample gradients stay local to their DP rank; branch
gradients are summed over DP; flat dot products and norms are summed over the model-parallel group counting
tensor-parallel-duplicated parameters once.

Memory bound (N = this rank's counted gradient entries, i.e. its parameters less TP duplicates): beyond the
model's own fp32 DDP grad buffers, diagnostics hold at most 2 fp32 vectors of N entries (coherence: the full and
the selected sums; cross-branch: the two branch gradients) = 8 N bytes, plus temporaries of at most CHUNK
entries in fp64 (16 MiB x 8 B x 2 = 256 MiB). Norms are streamed from the grad buffers per parameter and piece;
no fp64 copy of a gradient is ever made. (Before: a flat fp32 copy per gradient, fp64 copies for every norm and
dot: ~8 B + 16-24 B per entry transient, ~50 GB at 8B parameters.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_camopd.algo.diagnostics import coherence_gain
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


def _counted(engine) -> list[torch.Tensor]:
    """This rank's counted gradients (views of the DDP fp32 `main_grad` buffers, never copies): TP duplicates and
    tied copies outside the first pipeline stage are left out, so sums over the model-parallel group count each
    entry once."""
    out = []
    for chunk in engine.chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None or not param_is_not_tensor_parallel_duplicate(p):
                continue
            if getattr(p, "shared_embedding", False) and not ps.is_pipeline_first_stage(ignore_virtual=True):
                continue
            out.append(g.detach().reshape(-1))
    return out


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


def coherence_stats(engine, per_sample_batches: list, selected: list[bool], loss_spec) -> dict[str, float]:
    """Coherence of the full batch and of the selected subset, and GCG, from per-sample gradients.

    Each per-sample gradient stays in the DDP buffers: its norm is streamed from them and it is added onto the
    two fp32 sums (full, selected) parameter by parameter; no copy of it is made."""
    s_full = s_sel = None
    n_full = n_sel = 0.0
    for batch, keep in zip(per_sample_batches, selected):
        counts: list[int] = []
        engine.accumulate_grads(batch, loss_spec, finalize=_counting_finalize(counts), reduce=False)
        count = counts[0] if counts else 0
        if not count:
            continue
        # the per-sample gradient is the buffers' content / count (count 1: one sequence, sample_weight 1)
        norm = float(_mp_sum(_sumsq(_counted(engine)))) ** 0.5 / count
        s_full = flat_grad(engine, s_full, add=s_full is not None, alpha=1.0 / count)
        n_full += norm
        if keep:
            s_sel = flat_grad(engine, s_sel, add=s_sel is not None, alpha=1.0 / count)
            n_sel += norm
    dp = ps.get_data_parallel_group()
    present = torch.tensor([s_full is not None, s_sel is not None], dtype=torch.double, device=comm_device())
    dist.all_reduce(present, group=dp)
    if present[0] == 0:
        return {}
    size = sum(g.numel() for g in _counted(engine))  # a rank without samples still joins the DP sums
    s_full = s_full if s_full is not None else torch.zeros(size, device=comm_device())
    sums = torch.tensor([n_full, n_sel], dtype=torch.double, device=comm_device())
    dist.all_reduce(sums, group=dp)
    dist.all_reduce(s_full, group=dp)
    coh_full = float(_mp_sum(_sumsq([s_full]))) ** 0.5 / float(sums[0]) if sums[0] > 0 else float("nan")
    out = {"coherence_full": coh_full}
    if present[1] > 0:
        s_sel = s_sel if s_sel is not None else torch.zeros(size, device=comm_device())
        dist.all_reduce(s_sel, group=dp)
        if sums[1] > 0:
            out["coherence_selected"] = float(_mp_sum(_sumsq([s_sel]))) ** 0.5 / float(sums[1])
            out["gcg"] = coherence_gain(out["coherence_selected"], coh_full)
    return out
