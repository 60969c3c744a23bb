"""Checkpoint/resume: an interrupted CPU run reproduces the uninterrupted loss curve bit for bit, a checkpoint
saved at TP=2 resumes at TP=1 (resharding), and a crash mid-save leaves the previous checkpoint loadable."""

from __future__ import annotations

import json

import pytest

from megatron_camopd.backend.checkpoint import latest_checkpoint
from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import run_many, run_train, tiny_overrides


def _curve(rows):
    return [(r["step"], r["branch"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.mark.multiproc
def test_resume_is_bitwise_identical(tiny_root, tmp_path):
    full = tiny_overrides(tiny_root, tmp_path / "full", "train.steps=5", "checkpoint.save_interval=2")
    part = tiny_overrides(tiny_root, tmp_path / "part", "train.steps=3", "checkpoint.save_interval=2")
    rest = tiny_overrides(tiny_root, tmp_path / "part", "train.steps=5", "checkpoint.save_interval=2")
    a, _, b = run_on_ranks(run_many, 1, [full, part, rest])[0]
    assert _curve(a) == _curve(b)  # exact float equality, including the schedule position (G,G,G,D,G)
    state = json.loads((latest_checkpoint(tmp_path / "part") / "train_state.json").read_text())
    assert state["step"] == 5 and state["schedule"]["step"] == 5


@pytest.mark.multiproc
def test_resume_reshards_tp2_to_tp1(tiny_root, tmp_path):
    ref = run_on_ranks(run_train, 1, tiny_overrides(tiny_root, tmp_path / "ref", "train.steps=4"))[0]
    run_on_ranks(
        run_train,
        2,
        tiny_overrides(tiny_root, tmp_path / "rs", "train.steps=2", "parallel.tp=2", "checkpoint.save_interval=2"),
    )
    rows = run_on_ranks(run_train, 1, tiny_overrides(tiny_root, tmp_path / "rs", "train.steps=4"))[0]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(ref, rows):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (_curve(ref), _curve(rows))


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    good = tmp_path / "iter_0000002"
    good.mkdir()
    (good / "train_state.json").write_text('{"step": 2}')
    (tmp_path / "latest").write_text("iter_0000002\n")
    partial = tmp_path / "iter_0000004.tmp"  # a save that died before its rename
    partial.mkdir()
    (partial / "metadata.json").write_text("{")
    assert latest_checkpoint(tmp_path) == good
    (tmp_path / "latest").write_text("iter_0000009\n")  # marker naming something that never completed
    assert latest_checkpoint(tmp_path) == good
