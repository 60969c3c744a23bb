"""A demo/compare phase stopped by a signal (the trainer checkpoints and returns a `preempted` row) is not
recorded as done: `camopd compare` stops with the reason, and the next run trains the phase again instead of
reading a half-trained run as finished."""

from __future__ import annotations

from pathlib import Path

import pytest

import megatron_camopd.loop.train as train_mod
from megatron_camopd.demo import phases
from megatron_camopd.errors import CamopdError
from tests.helpers import TINY_SPEC


@pytest.mark.parametrize("preempted", [True, False])
def test_a_phase_stopped_by_a_signal_is_not_recorded_as_done(tmp_path: Path, monkeypatch, preempted: bool) -> None:
    calls = []

    def fake_train(spec):  # what train.train returns after a SIGTERM: the checkpointed step, marked preempted
        calls.append(spec)
        Path(spec.checkpoint.dir).mkdir(parents=True, exist_ok=True)
        return {"step": 3, "preempted": True} if preempted else {"step": 8}

    monkeypatch.setattr(train_mod, "train", fake_train)
    if preempted:
        with pytest.raises(CamopdError, match="stopped by a signal at step 3.*not recorded as done"):
            phases.run_phase(tmp_path, "p", TINY_SPEC, "digest")
        assert not (tmp_path / "p" / "demo_phase.json").exists()
    else:
        out, trained = phases.run_phase(tmp_path, "p", TINY_SPEC, "digest")
        assert trained and (out / "demo_phase.json").exists()
        assert phases.run_phase(tmp_path, "p", TINY_SPEC, "digest") == (out, False)  # cached
    assert len(calls) == 1
