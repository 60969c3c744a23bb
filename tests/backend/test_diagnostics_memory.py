"""Gradient diagnostics stream the gradient: same values as a naive fp64 computation over concatenated
gradients, with at most two gradient-sized fp32 vectors and no fp64 tensor larger than one piece (CHUNK)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_camopd.backend import diagnostics as gd
from megatron_camopd.backend.loss import LossSpec

from ._layout_workers import fixed_batch


class _Allocations(TorchDispatchMode):
    """Records (dtype, numel) of every tensor an op creates (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.made.append((t.dtype, t.numel()))
        return out


@pytest.fixture(scope="module")
def engine(megatron_world, tiny_hf_dirs):
    from megatron_camopd.backend.engine import Engine
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch

    hf = tiny_hf_dirs["qwen3"]
    arch = ModelArch.from_hf_dir(hf)
    return Engine(arch, micro_batch_size=1, init_fn=lambda ch: load_hf_weights(ch, hf, arch, 0, 1, 0, 1))


def _per_sample():
    full = fixed_batch()
    return [{k: v[i : i + 1] for k, v in full.items()} for i in range(full["tokens"].shape[0])]


def _naive_grad(engine, batch, spec):
    counts: list[int] = []
    engine.accumulate_grads(batch, spec, finalize=gd._counting_finalize(counts), reduce=False)
    return torch.cat([g.double().clone() for g in gd._counted(engine)]) / counts[0]


def test_streamed_values_match_naive_fp64(engine) -> None:
    spec = LossSpec(loss="pg", is_weight="none")
    batches, keep = _per_sample(), [True, False, True, True]
    got = gd.coherence_stats(engine, batches, keep, spec)
    grads = [_naive_grad(engine, b, spec) for b in batches]
    coh = lambda gs: float(torch.stack(gs).sum(0).norm() / sum(g.norm() for g in gs))  # noqa: E731
    want_full, want_sel = coh(grads), coh([g for g, k in zip(grads, keep) if k])
    assert abs(got["coherence_full"] - want_full) < 1e-6 * want_full
    assert abs(got["coherence_selected"] - want_sel) < 1e-6 * want_sel
    assert 0 < want_full < 1
    g1, n1 = gd.branch_grad(engine, batches[0], spec)
    g1 = g1.clone()
    g2, n2 = gd.branch_grad(engine, batches[1], spec)
    dot, cos = gd.dot_cosine(engine, g1, g2)
    assert (n1, n2) == (1, 1)
    assert abs(dot - float(grads[0] @ grads[1])) < 1e-6 * abs(dot)
    assert abs(cos - float(grads[0] @ grads[1] / grads[0].norm() / grads[1].norm())) < 1e-6


def test_bounded_allocations(engine, monkeypatch) -> None:
    monkeypatch.setattr(gd, "CHUNK", 1000)
    spec = LossSpec(loss="pg", is_weight="none")
    n = sum(g.numel() for g in gd._counted(engine))
    assert n > 100 * 1000  # the gradient spans many pieces
    batches = _per_sample()
    for _ in range(2):  # warm-up: the model's own buffers and caches
        engine.accumulate_grads(batches[0], spec)
    mode = _Allocations()
    with mode:
        gd.coherence_stats(engine, batches, [True, False, True, True], spec)
    big = [(dt, k) for dt, k in mode.made if k >= n]
    assert len(big) <= 2, big  # the full and the selected sums, allocated once
    assert all(dt == torch.float32 for dt, _ in big), big
    fp64 = [k for dt, k in mode.made if dt == torch.float64]
    assert max(fp64) <= 1000, max(fp64)  # fp64 only for one piece at a time
