"""Sequence parallelism and activation recomputation reach megatron-core and change nothing but memory; every
micro-batch runs at its own longest row's width (padded to TP under SP), also through the pipeline (1F1B; the
interleaved schedule runs one width per call).

One spawn of 2 gloo ranks builds each layout from the same HF weights and accumulates the gradient of one batch
of rows of lengths 5, 11, 7, 3 in micro-batches of 2 rows.
"""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.forward import fit_width, split_microbatches, width_multiple
from megatron_camopd.backend.spawn import run_on_ranks

from ._layout_workers import layout_suite

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def suite(tiny_hf_dirs):
    return run_on_ranks(layout_suite, 2, tiny_hf_dirs["qwen3"], tiny_hf_dirs["llama_tied4"])


def _same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a["stats"].keys() == b["stats"].keys()
    for k in a["stats"]:
        assert abs(a["stats"][k] - b["stats"][k]) <= atol * max(1.0, abs(a["stats"][k])), (k, a["stats"], b["stats"])
    assert a["grads"].keys() == b["grads"].keys()
    for k in a["grads"]:
        torch.testing.assert_close(a["grads"][k], b["grads"][k], atol=atol, rtol=1e-5, msg=k)


def test_sequence_parallel_same_loss_and_grads(suite) -> None:
    for rank in suite:
        off, on = rank["tp2"], rank["tp2_sp"]
        assert on["config"]["sequence_parallel"] is True and off["config"]["sequence_parallel"] is False
        _same(off, on)
        assert on["widths"] == [12, 8]  # own longest row (11, 7) padded to a multiple of TP=2
        assert off["widths"] == [11, 7]
        assert any(g.abs().sum() > 0 for g in on["grads"].values())
    # the norm weights' gradients are summed over TP under SP: both ranks hold the same full gradient
    r0, r1 = suite[0]["tp2_sp"]["grads"], suite[1]["tp2_sp"]["grads"]
    norms = [k for k in r0 if "layernorm" in k or "final_layernorm" in k]
    assert norms and all(torch.equal(r0[k], r1[k]) for k in norms)


def test_recompute_same_loss_and_grads_and_actually_recomputes(suite) -> None:
    for rank in suite:
        base = rank["tp2"]
        assert base["config"]["recompute_granularity"] is None
        for name, granularity in (("tp2_full", "full"), ("tp2_selective", "selective")):
            r = rank[name]
            assert r["config"]["recompute_granularity"] == granularity
            _same(base, r, atol=0.0)
            assert r["mlp_calls"] == 2 * base["mlp_calls"], name  # every layer's MLP re-runs in backward
        assert rank["tp2_selective"]["config"]["recompute_modules"] == ["mlp", "core_attn"]
        assert rank["tp2_full"]["config"]["recompute_method"] == "uniform"
        _same(rank["tp2_sft"], rank["tp2_sp_full"])  # both together


def test_own_width_micro_batches_change_nothing(suite) -> None:
    for rank in suite:
        assert rank["tp2_full_width"]["widths"] == [13, 13]
        _same(rank["tp2_full_width"], rank["tp2"])


def test_variable_widths_through_the_pipeline(suite) -> None:
    for name in ("pp2", "vpp2"):
        last = suite[1][name]
        assert last["stats"]["count"] == 4
        for rank in suite:
            _same(rank[name + "_full_width"], rank[name])
    # 1F1B: each micro-batch at its own width (shapes sent ahead); interleaved: the call's widest one
    assert suite[0]["pp2"]["widths"] == [11, 7], suite[0]["pp2"]["widths"]
    assert set(suite[0]["vpp2"]["widths"]) == {11}, suite[0]["vpp2"]["widths"]


class _Cfg:
    def __init__(self, tp, sp, fp8):
        self.tensor_model_parallel_size, self.sequence_parallel, self.fp8 = tp, sp, fp8


def test_width_multiple_and_split() -> None:
    assert width_multiple(_Cfg(4, False, None)) == 1
    assert width_multiple(_Cfg(4, True, None)) == 4
    assert width_multiple(_Cfg(1, False, "hybrid")) == 16
    assert width_multiple(_Cfg(2, True, "e4m3")) == 32
    batch = {
        "tokens": torch.arange(4 * 6).reshape(4, 6),
        "topk": torch.ones(4, 6, 3),
        "w": torch.ones(4),
        "seq_len": torch.tensor([2, 6, 1, 0]),
    }
    mbs = split_microbatches(batch, 2, multiple=4)
    assert [mb["tokens"].shape[1] for mb in mbs] == [8, 4]  # 6 -> 8 (padded), 1 -> 4 (cut)
    assert mbs[0]["topk"].shape == (2, 8, 3) and mbs[0]["topk"][:, 6:].abs().sum() == 0
    assert torch.equal(mbs[1]["tokens"], batch["tokens"][2:, :4]) and mbs[1]["w"].shape == (2,)
    assert torch.equal(mbs[0]["seq_len"], torch.tensor([2, 6]))
    assert fit_width(batch, 6, 6) is batch
