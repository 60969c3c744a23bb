"""run_on_ranks error propagation (results in rank order over gloo are covered by test_multirank.py)."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import failing_on_rank_one

pytestmark = pytest.mark.multiproc


def test_a_failing_rank_raises_in_the_caller() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="boom on rank one"):
        run_on_ranks(failing_on_rank_one, 2, "boom on rank one")
