"""Gradient diagnostics on the real Megatron engine: the per-sample Gram matrix equals a naive fp64 computation
(exact rows) or estimates it without bias (CountSketch rows), the cross-branch instruments match the naive
gradients, and memory stays bounded: no fp64 tensor larger than one piece (CHUNK) or the Gram matrix, no
gradient-sized vector in the sketched Gram path, at most three in the cross-branch path."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_camopd.algo.diagnostics import subset_coherence
from megatron_camopd.backend import sample_grads as gd
from megatron_camopd.backend.loss import LossSpec

from ._layout_workers import fixed_batch

SPEC = LossSpec(loss="pg", is_weight="none")


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


def _rows(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def _naive_grad(engine, batch):
    counts: list[int] = []
    engine.accumulate_grads(batch, SPEC, finalize=gd._counting_finalize(counts), reduce=False)
    return torch.cat([g.double().clone() for g in gd._counted(engine)]) / counts[0]


def _n(engine) -> int:
    return sum(g.numel() for g in gd._counted(engine))


def test_exact_gram_matches_naive_fp64(engine) -> None:
    batches = _per_sample()
    labels = [[True, False], [False, True], [True, True], [True, False]]
    k, lab = gd.per_sample_gram(engine, batches, labels, SPEC, sketch_dim=_n(engine))
    grads = torch.stack([_naive_grad(engine, b) for b in batches])
    want = grads @ grads.T
    assert k.shape == (4, 4) and torch.allclose(k, want, rtol=1e-5, atol=1e-9 * float(want.abs().max()))
    assert lab.tolist() == labels
    sel = torch.tensor([True, False, True, True])
    coh = lambda g: float(g.sum(0).norm() / g.norm(dim=1).sum())  # noqa: E731
    assert float(subset_coherence(k, sel)) == pytest.approx(coh(grads[sel]), rel=1e-5)
    assert 0 < float(subset_coherence(k, torch.ones(4, dtype=torch.bool))) < 1


def test_sketched_gram_is_an_unbiased_estimate(engine) -> None:
    """A CountSketch of width m keeps inner products on average (error ~ ||a|| ||b|| / sqrt(m)): over seeds the
    sketched Gram matrix averages to the exact one, far closer than one sketch is."""
    batches = _per_sample()
    labels = [[True]] * 4
    exact, _ = gd.per_sample_gram(engine, batches, labels, SPEC, sketch_dim=_n(engine))
    width = _n(engine) // 64
    sketches = [gd.per_sample_gram(engine, batches, labels, SPEC, sketch_dim=width, seed=s)[0] for s in range(12)]
    scale = float(exact.diagonal().sqrt().outer(exact.diagonal().sqrt()).max())
    one = float((sketches[0] - exact).abs().max()) / scale
    avg = float((torch.stack(sketches).mean(0) - exact).abs().max()) / scale
    assert one < 10 / math.sqrt(width)  # a single sketch is within a few standard errors
    assert avg < one  # and averaging sketches converges on the exact Gram matrix
    assert torch.allclose(sketches[0].diagonal(), exact.diagonal(), rtol=0.2)


def test_cross_branch_matches_naive_gradients(engine) -> None:
    full = fixed_batch()
    halves = {"general": (_rows(full, [0]), _rows(full, [1])), "domain": (_rows(full, [2]), _rows(full, [3]))}
    out = gd.cross_branch(engine, halves, SPEC)
    g = [_naive_grad(engine, _rows(full, [i])) for i in range(4)]
    g_g, g_d = (g[0] + g[1]) / 2, (g[2] + g[3]) / 2
    cos = lambda a, b: float(a @ b / a.norm() / b.norm())  # noqa: E731
    assert out["grad_dot"] == pytest.approx(float(g_g @ g_d), rel=1e-5)
    assert out["grad_cos"] == pytest.approx(cos(g_g, g_d), rel=1e-5, abs=1e-7)
    assert out["norm_ratio"] == pytest.approx(float(g_d.norm() / g_g.norm()), rel=1e-5)
    assert out["counteracted"] == pytest.approx(-float(g_g @ g_d) / float(g_g @ g_g), rel=1e-5)
    assert out["split_cos/general"] == pytest.approx(cos(g[0], g[1]), rel=1e-5, abs=1e-7)
    assert out["split_cos/domain"] == pytest.approx(cos(g[2], g[3]), rel=1e-5, abs=1e-7)
    shares = [v for key, v in out.items() if key.endswith("/dot_share")]
    assert shares and sum(shares) == pytest.approx(1.0, rel=1e-6)  # the per-tensor breakdown adds up


def test_bounded_allocations(engine, monkeypatch) -> None:
    monkeypatch.setattr(gd, "CHUNK", 1000)
    n = _n(engine)
    assert n > 100 * 1000  # the gradient spans many pieces
    batches = _per_sample()
    for _ in range(2):  # warm-up: the model's own buffers and caches
        engine.accumulate_grads(batches[0], SPEC)
    mode = _Allocations()
    with mode:
        gd.per_sample_gram(engine, batches, [[True]] * 4, SPEC, sketch_dim=500)
    assert not [k for _, k in mode.made if k >= n]  # sketched rows: nothing gradient-sized
    fp64 = [k for dt, k in mode.made if dt == torch.float64]
    assert max(fp64) <= 1000, max(fp64)  # fp64 only for one piece at a time
    full = fixed_batch()
    halves = {"general": (_rows(full, [0]), _rows(full, [1])), "domain": (_rows(full, [2]), _rows(full, [3]))}
    mode = _Allocations()
    with mode:
        gd.cross_branch(engine, halves, SPEC)
    big = [(dt, k) for dt, k in mode.made if k >= n]
    assert len(big) <= 4, big  # two halves per branch, one freed before the next branch
    assert all(dt == torch.float32 for dt, _ in big), big
    assert max(k for dt, k in mode.made if dt == torch.float64) <= 1000
