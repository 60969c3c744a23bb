"""The paper's gradient diagnostics, computed with the real Megatron model at the current parameters.

- cross-branch `<g_g, g_d>` and cosine: the gradient of each branch's loss on its latest batch, both taken at the
  same (current) parameters before the update. In alternating mode the other branch's latest batch (and its
  signals) is cached from the step that trained on it.
- within-branch coherence `Coh(A) = ||sum_i g_i|| / sum_i ||g_i||` over per-sample gradients, for the full
  candidate batch and the selected subset, and `GCG = (Coh(sel) - Coh(full)) / Coh(full) * 100`.

Each per-sample gradient is one extra forward/backward (opt-in: `logging.diagnostics`). Per-sample gradients stay
local to their DP rank; branch gradients are summed over DP; flat dot products and norms are summed over the
model-parallel group counting tensor-parallel-duplicated parameters once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_camopd.algo.diagnostics import coherence_gain
from megatron_camopd.backend.forward import comm_device


def _counting_finalize(counts: list):
    """A finalize that does no DP all-reduce and no scaling; it records the step's count (from the last stage)."""

    def finalize(model, num_tokens=None, **kwargs):
        if num_tokens is not None and ps.get_pipeline_model_parallel_world_size() > 1:
            num_tokens = num_tokens.clone()
            dist.broadcast(num_tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        counts.append(int(num_tokens) if num_tokens is not None else 0)

    return finalize


def flat_grad(engine) -> torch.Tensor:
    """This rank's unique gradient entries as one fp32 vector (TP duplicates and tied copies counted once)."""
    parts = []
    for chunk in engine.chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None or not param_is_not_tensor_parallel_duplicate(p):
                continue
            if getattr(p, "shared_embedding", False) and not ps.is_pipeline_first_stage(ignore_virtual=True):
                continue
            parts.append(g.detach().float().reshape(-1).clone())
    return torch.cat(parts) if parts else torch.zeros(0, device=comm_device())


def _mp_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double().to(comm_device())
    dist.all_reduce(x, group=ps.get_model_parallel_group())
    return x


def branch_grad(engine, batch, loss_spec, *, over_dp: bool = False) -> tuple[torch.Tensor, int]:
    """(gradient of the mean selected-sequence loss, number of selected sequences) at the current parameters.

    `over_dp=False`: this rank's rows only (per-sample gradients). `over_dp=True`: every DP rank passes its slice
    and gets the gradient of the whole batch (collective over DP).
    """
    counts: list[int] = []
    engine.accumulate_grads(batch, loss_spec, finalize=_counting_finalize(counts), reduce=False)
    g = flat_grad(engine).to(comm_device())
    n = torch.tensor([float(counts[0]) if counts else 0.0], device=comm_device())
    if over_dp:
        dist.all_reduce(g, group=ps.get_data_parallel_group())
        dist.all_reduce(n, group=ps.get_data_parallel_group())
    count = int(n.item())
    return (g / count if count else g), count


def dot_cosine(engine, g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    """Global dot product and cosine of two flat gradients (summed over the model-parallel group)."""
    vals = _mp_sum(torch.stack([(g1.double() * g2.double()).sum(), g1.double().pow(2).sum(),
                                g2.double().pow(2).sum()]))
    dot, n1, n2 = vals.tolist()
    denom = (n1 ** 0.5) * (n2 ** 0.5)
    return dot, (dot / denom if denom > 0 else float("nan"))


def coherence_stats(engine, per_sample_batches: list, selected: list[bool], loss_spec) -> dict[str, float]:
    """Coherence of the full batch and of the selected subset, and GCG, from per-sample gradients."""
    s_full = s_sel = None
    n_full = n_sel = 0.0
    for batch, keep in zip(per_sample_batches, selected):
        g, _ = branch_grad(engine, batch, loss_spec)
        norm = float(_mp_sum(g.double().pow(2).sum())) ** 0.5
        s_full = g.clone() if s_full is None else s_full.add_(g)
        n_full += norm
        if keep:
            s_sel = g.clone() if s_sel is None else s_sel.add_(g)
            n_sel += norm
    if s_full is None:
        return {}
    dp = ps.get_data_parallel_group()
    sums = torch.tensor([n_full, n_sel], dtype=torch.double, device=comm_device())
    dist.all_reduce(sums, group=dp)
    for vec in (s_full, s_sel):
        if vec is not None:
            dist.all_reduce(vec, group=dp)
    coh_full = float(_mp_sum(s_full.double().pow(2).sum())) ** 0.5 / float(sums[0]) if sums[0] > 0 else float("nan")
    out = {"coherence_full": coh_full}
    if s_sel is not None and sums[1] > 0:
        out["coherence_selected"] = float(_mp_sum(s_sel.double().pow(2).sum())) ** 0.5 / float(sums[1])
        out["gcg"] = coherence_gain(out["coherence_selected"], coh_full)
    return out
