"""Resuming with a spec that differs from the checkpoint's: every differing field is reported (dotted name,
old -> new); train.lr / train.steps apply (the new peak lr from the resumed step on, the run to the new total);
fields that change the model's shape, the method or the data order are refused before any model loads."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from megatron_camopd.backend.checkpoint import latest_checkpoint
from megatron_camopd.errors import SpecError
from megatron_camopd.loop.metrics import read_metrics
from megatron_camopd.loop.resume import check_checkpoint_dir, check_spec_changes, judge, spec_diff
from tests.helpers import run_cli

from ._workers import TINY_SPEC, tiny_overrides

pytestmark = pytest.mark.timeout(300)


def _train(*args: str) -> subprocess.CompletedProcess:
    return run_cli("train", str(TINY_SPEC), *args, timeout=240)


@pytest.fixture(scope="module")
def one_step(tiny_root, tmp_path_factory):
    """A checkpoint after one step of the tiny spec (train.steps=1, lr 1e-3)."""
    root = tmp_path_factory.mktemp("one_step")
    res = _train(*tiny_overrides(tiny_root, root, "train.steps=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return root


def test_changed_lr_and_steps_are_reported_and_applied(tiny_root, one_step, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(one_step, ckpt)
    res = _train(*tiny_overrides(tiny_root, ckpt, "train.steps=3", "train.lr=0.002"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "spec differs: train.lr: 0.001 -> 0.002 (the LR schedule is rebuilt" in res.stderr
    assert "spec differs: train.steps: 1 -> 3 (the run continues to the new total)" in res.stderr
    rows = read_metrics(ckpt / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == [0.001, 0.002, 0.002]  # the optimizer really steps with the new lr
    state = json.loads((latest_checkpoint(ckpt) / "train_state.json").read_text())
    assert state["step"] == 3 and state["spec"]["train"]["lr"] == 0.002


def test_changed_architecture_is_refused_before_models_load(tiny_root, one_step, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(one_step, ckpt)
    wider = tmp_path / "wider_student"
    shutil.copytree(tiny_root / "student", wider)
    cfg = json.loads((wider / "config.json").read_text())
    old = cfg["intermediate_size"]
    cfg["intermediate_size"] = old * 2
    (wider / "config.json").write_text(json.dumps(cfg))
    res = _train(*tiny_overrides(tiny_root, ckpt, "train.steps=3"), f"model.hf_path={wider}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"intermediate_size: {old} -> {old * 2}" in res.stderr and "Traceback" not in res.stderr
    assert "teacher general ready" not in res.stderr


def test_refused_fields_are_named_with_old_and_new_values():
    old = {
        "data": {"seed": 0, "streams": [{"path": "a.jsonl"}]},
        "train": {"lr": 1e-3, "seed": 0},
        "method": {"name": "camopd"},
        "parallel": {"tp": 2, "vpp": None},
        "teachers": {"g": {"hf_path": "x", "timeout_s": 1.0}},
    }
    new = {
        "data": {"seed": 1, "streams": [{"path": "b.jsonl"}]},
        "train": {"lr": 2e-3, "seed": 0},
        "method": {"name": "mopd"},
        "parallel": {"tp": 1, "vpp": 2},
        "teachers": {"g": {"hf_path": "x", "timeout_s": 9.0}},
    }
    diff = {f: (a, b) for f, a, b in spec_diff(old, new)}
    assert set(diff) == {
        "data.seed",
        "data.streams.0.path",
        "train.lr",
        "method.name",
        "parallel.tp",
        "parallel.vpp",
        "teachers.g.timeout_s",
    }
    applied = {f for f, (a, b) in diff.items() if judge(f, a, b)[0]}
    assert applied == {"train.lr", "parallel.tp", "teachers.g.timeout_s"}
    with pytest.raises(SpecError) as err:
        check_spec_changes("ckpt", old, new)
    msg = str(err.value)
    for text in (
        "data.seed: 0 -> 1",
        "data.streams.0.path: 'a.jsonl' -> 'b.jsonl'",
        "method.name: 'camopd' -> 'mopd'",
        "parallel.vpp: None -> 2",
    ):
        assert text in msg
    assert "train.lr" not in msg
    added = {"teachers": {"g": {"hf_path": "x"}, "extra": {"hf_path": "y"}}}
    assert not judge("teachers.extra.hf_path", "<absent>", "y")[0]
    assert spec_diff({"teachers": {"g": {"hf_path": "x"}}}, added) == [("teachers.extra.hf_path", "<absent>", "y")]


def test_checkpoint_dir_must_be_a_writable_directory(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for bad in (f, f / "ckpt", f / "a" / "b"):
        with pytest.raises(SpecError, match="checkpoint.dir"):
            check_checkpoint_dir(str(bad))
    assert check_checkpoint_dir(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
