"""run_on_ranks: per-rank results in rank order, torchrun-style environment, errors propagate."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import allreduce_ranks, failing_on_rank_one

pytestmark = pytest.mark.multiproc


def test_results_in_rank_order_over_a_gloo_world() -> None:
    assert run_on_ranks(allreduce_ranks, 3) == [3.0, 3.0, 3.0]


def test_a_failing_rank_raises_in_the_caller() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="boom on rank one"):
        run_on_ranks(failing_on_rank_one, 2, "boom on rank one")
