"""train.overlap_grad_reduce (issue 29, defect 9): megatron-core's overlapped bucket reductions give the losses of
the synchronous reduction at DP=2 over gloo, also with the gradient diagnostics' extra backward passes (which
`Engine.local_grads` keeps from launching the reductions)."""

from __future__ import annotations

import math

import pytest

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import run_train, tiny_overrides


@pytest.mark.multiproc
@pytest.mark.parametrize("diagnostics", [False, True])
def test_overlap_matches_sync_dp2(tiny_root, tmp_path, diagnostics):
    extra = ["train.steps=3", "train.micro_batch_size=2"]
    if diagnostics:
        extra += [
            "schedule.mode=mixed",
            "schedule.mix_ratio=[1,1]",
            "logging.diagnostics=true",
            "logging.diagnostics_interval=1",
            "logging.diagnostics_start=0",
        ]
    rows = {
        ov: run_on_ranks(
            run_train, 2, tiny_overrides(tiny_root, tmp_path / str(ov), *extra, f"train.overlap_grad_reduce={ov}")
        )[0]
        for ov in ("false", "true")
    }
    a, b = rows["false"], rows["true"]
    assert len(a) == len(b) == 3
    if diagnostics:
        diag = sorted({k for r in a for k in r if k.startswith("diag_")})
        assert diag and diag == sorted({k for r in b for k in r if k.startswith("diag_")})
    for x, y in zip(a, b):
        assert math.isfinite(x["loss"]) and abs(x["loss"] - y["loss"]) < 1e-5, (a, b)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"])
        if diagnostics:
            for k in diag:
                if isinstance(x.get(k), float) and math.isfinite(x[k]):
                    assert abs(x[k] - y[k]) < 1e-4 * max(1.0, abs(x[k])), k
