"""Inside Megatron, a step optimises exactly the spec's loss: per-sequence token means of the policy-gradient
(or top-k) terms, then the mean over selected sequences — for any micro-batch size."""

from __future__ import annotations

import pytest

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import loss_vs_formula, tiny_overrides


@pytest.mark.multiproc
@pytest.mark.parametrize("extra", [(), ("method.loss=topk", "method.topk=4")], ids=["pg", "topk"])
def test_megatron_loss_equals_formula(tiny_root, tmp_path, extra):
    res = run_on_ranks(loss_vs_formula, 1, tiny_overrides(tiny_root, tmp_path / "c", *extra), [1, 4, 8])[0]
    for got, ref in res:
        assert abs(got - ref) < 1e-5 * max(1.0, abs(ref)), res
    assert abs(res[0][0] - res[2][0]) < 1e-6  # micro-batching does not change the loss
