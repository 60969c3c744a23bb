"""A method added in one file (tests/train/_plugin_method.py) trains end to end from a spec: validation, the
session, rollouts, teacher scoring and the Megatron loss all take it from the registry, and its own parameter
(`method.half_gap.factor`) reaches its maths from the spec."""

from __future__ import annotations

import pytest

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import tiny_overrides


def _train_both(rank: int, world: int, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """In the spawned rank only: importing the plug-in registers `half_gap` there, not in the test process."""
    from ._plugin_method import train_both

    return train_both(rank, world, runs)


@pytest.mark.multiproc
def test_a_method_registered_in_one_file_trains_from_a_spec(tiny_root, tmp_path):
    mixed = ("schedule.mode=mixed", "schedule.mix_ratio=[1,1]", "train.steps=1")
    runs = {
        name: tiny_overrides(tiny_root, tmp_path / name, f"method.name={name}", *mixed) for name in ("opd", "half_gap")
    }
    runs["quarter"] = tiny_overrides(
        tiny_root, tmp_path / "quarter", "method.name=half_gap", "method.half_gap.factor=0.25", *mixed
    )
    res = run_on_ranks(_train_both, 1, runs)[0]
    opd, half, quarter = res["opd"][0], res["half_gap"][0], res["quarter"][0]
    assert half["loss"] == 0.5 * opd["loss"] and opd["loss"] != 0.0
    assert half["grad_norm"] == 0.5 * opd["grad_norm"] and opd["grad_norm"] > 0.0
    assert quarter["loss"] == 0.25 * opd["loss"] and quarter["grad_norm"] == 0.25 * opd["grad_norm"]
    assert half["mean_gap"] == opd["mean_gap"] == quarter["mean_gap"]  # the same rollouts, same teachers
