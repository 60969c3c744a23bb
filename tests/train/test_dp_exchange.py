"""DP ranks exchange samples without their top-k tensors (per-sample scalars stand in) and train exactly as with
the full exchange: a DP=2 run of the top-k loss and of SelecTKD gives bit-identical metrics rows."""

from __future__ import annotations

import math

import pytest

from megatron_camopd.backend.spawn import run_on_ranks

from ._dp_exchange_workers import scalar_vs_full
from ._workers import tiny_overrides

KEYS = ("loss", "grad_norm", "selected_fraction", "acceptance_rate", "mean_gap", "train_sequences")


@pytest.mark.multiproc
def test_scalar_exchange_trains_bitwise_like_full_exchange(tiny_root, tmp_path):
    common = ("train.steps=2", "train.micro_batch_size=2")
    methods = {"topk": ("method.loss=topk", "method.topk=4"), "selectkd": ("method.name=selectkd",)}
    runs = {
        name: (
            tiny_overrides(tiny_root, tmp_path / f"{name}_scalar", *common, *extra),
            tiny_overrides(tiny_root, tmp_path / f"{name}_full", *common, *extra),
        )
        for name, extra in methods.items()
    }
    res = run_on_ranks(scalar_vs_full, 2, runs)[0]
    for name, (scalar, full) in res.items():
        assert len(scalar) == len(full) == 2, name
        for a, b in zip(scalar, full):
            assert math.isfinite(a["loss"]) and a["selected_fraction"] > 0, (name, a)
            for k in KEYS:
                if k in b:
                    assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), (name, k, a[k], b[k])
    assert "acceptance_rate" in res["selectkd"][0][0]
