"""Checkpoint integrity: every checkpoint carries a manifest (size + sha256 per file) that loads verify; corrupt,
truncated, empty or half-written files are refused by name (a message, never a traceback), `checkpoint.resume:
auto` falls back to the newest checkpoint that verifies, `checkpoint.dir` under a regular file is refused before
any model loads, and a `kill -9` of a trainer that has saved leaves no helper process behind.

One real trainer (the CLI, tiny spec) is started once per module, killed with SIGKILL after its second save; its
two checkpoints are copied for every test.

The files damaged are found by their role in the checkpoint at hand, since megatron-core versions write different
ones: 0.16.1 writes the common (non-tensor) state to `common.pt` and a rank's tensors to `__0_0.distcp` and
`__0_1.distcp`; 0.19.2 writes one `__0_0.distcp` per rank holding the tensors and the common state (a
`common_state` object, located through `.metadata`), and no `common.pt`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from megatron_camopd.backend.checkpoint import MCORE_VERSION as MCORE
from megatron_camopd.backend.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint
from megatron_camopd.backend.manifest import MANIFEST
from megatron_camopd.errors import CheckpointError
from tests.helpers import TINY_SPEC, cli_argv, run_cli

pytestmark = pytest.mark.timeout(300)


def _overrides(tiny: Path, ckpt: Path, *extra: str) -> list[str]:
    from megatron_camopd.demo.tiny import tiny_spec_overrides

    return [
        *tiny_spec_overrides(tiny),
        f"checkpoint.dir={ckpt}",
        "logging.progress=off",
        "logging.diagnostics=false",
        "rollout.max_new_tokens=12",
        *extra,
    ]


def _cli(*args: str) -> list[str]:
    return cli_argv("train", str(TINY_SPEC), *args)


def _train(*args: str) -> subprocess.CompletedProcess:
    return run_cli("train", str(TINY_SPEC), *args, timeout=240)


def _alive(procs: list) -> list[int]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A trainer that saved iter_1 and iter_2, then was killed with SIGKILL; its descendants then and after."""
    from megatron_camopd.demo.tiny import make_tiny_setup

    tiny = make_tiny_setup(tmp_path_factory.mktemp("tiny"))
    run = tmp_path_factory.mktemp("killed")
    proc = subprocess.Popen(
        _cli(*_overrides(tiny, run, "train.steps=50", "checkpoint.save_interval=1", "checkpoint.keep_last=null")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (run / "iter_0000002" / MANIFEST).exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the trainer did not save twice in time"
        time.sleep(0.1)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    t0 = time.time()
    while _alive(descendants) and time.time() - t0 < 5:
        time.sleep(0.1)
    survivors = _alive(descendants)
    for pid in survivors:  # do not leak them into the rest of the suite
        psutil.Process(pid).kill()
    base = tmp_path_factory.mktemp("base")
    for name in ("iter_0000001", "iter_0000002", "hf"):
        shutil.copytree(run / name, base / name)
    (base / "latest").write_text("iter_0000002\n")
    return SimpleNamespace(tiny=tiny, base=base, descendants=descendants, survivors=survivors)


@pytest.fixture
def ckpt(killed_run, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(killed_run.base, dst)
    return dst


def test_kill9_leaves_no_process(killed_run):
    assert killed_run.survivors == [], [(p.pid, p.name()) for p in killed_run.descendants]


def test_manifest_lists_every_file(ckpt):
    it = ckpt / "iter_0000002"
    entries = json.loads((it / MANIFEST).read_text())["files"]
    on_disk = sorted(p.relative_to(it).as_posix() for p in it.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(e["path"] for e in entries) == on_disk
    assert {".metadata", "train_state.json", "scheduler.pt", "rng/rank0.pt"} <= set(on_disk)
    assert all((it / e["path"]).stat().st_size == e["size"] and len(e["sha256"]) == 64 for e in entries)
    verify_checkpoint(it)  # intact: no error


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _distcp(it: Path) -> list[str]:
    return sorted(p.name for p in it.glob("*.distcp"))


def _common_state_file(it: Path) -> str:
    """Where this checkpoint keeps its common state: common.pt (megatron-core < 0.17), else the .distcp file that
    `.metadata` names for the `common_state` object."""
    if (it / "common.pt").exists():
        return "common.pt"
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(it)).read_metadata()
    files = {v.relative_path for k, v in meta.storage_data.items() if k.fqn.startswith("common_state")}
    assert len(files) == 1, files
    return files.pop()


# case -> (the damaged file, given the iter dir; the damage)
CORRUPTIONS = {
    "flipped_distcp": (lambda it: _distcp(it)[0], _flip),
    "truncated_distcp": (lambda it: _distcp(it)[-1], _truncate),
    "truncated_metadata": (lambda it: ".metadata", _truncate),
    "empty_rng": (lambda it: "rng/rank0.pt", lambda f: f.write_bytes(b"")),
    "empty_scheduler": (lambda it: "scheduler.pt", lambda f: f.write_bytes(b"")),
    "half_train_state": (lambda it: "train_state.json", _truncate),
    "missing_common": (_common_state_file, lambda f: f.unlink()),
    "broken_manifest": (lambda it: MANIFEST, _truncate),
}


def test_the_layout_is_the_one_this_megatron_core_writes(ckpt):
    """The file names the cases above resolve, per version (a new layout shows here first)."""
    it = ckpt / "iter_0000002"
    if tuple(int(x) for x in MCORE.split(".")[:2]) < (0, 17):
        assert _distcp(it) == ["__0_0.distcp", "__0_1.distcp"] and _common_state_file(it) == "common.pt"
    else:
        assert _distcp(it) == ["__0_0.distcp"] and _common_state_file(it) == "__0_0.distcp"
        assert not (it / "common.pt").exists()


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_verification_names_the_bad_file(ckpt, case):
    where, damage = CORRUPTIONS[case]
    it = ckpt / "iter_0000002"
    name = where(it)
    damage(it / name)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(it)
    assert str(it / name) in str(err.value)


def test_latest_skips_checkpoints_without_manifest(ckpt):
    shutil.copytree(ckpt / "iter_0000002", ckpt / "iter_0000003")
    (ckpt / "iter_0000003" / MANIFEST).unlink()  # e.g. copied by hand, never completed
    (ckpt / "latest").write_text("iter_0000003\n")
    assert latest_checkpoint(ckpt) == ckpt / "iter_0000002"


def test_legacy_load_errors_are_messages(ckpt, megatron_world):
    """Without a manifest (checkpoints of older versions) the load itself must still fail with a message: torch's
    CheckpointException (a BaseException), pickle/EOF errors of empty files, JSON errors."""
    from megatron_camopd.backend.engine import Engine, OptimSettings
    from megatron_camopd.backend.model import ModelArch

    engine = Engine(ModelArch.from_hf_dir(ckpt / "hf"), optim=OptimSettings(lr=1e-3, total_steps=50))
    cases = ["truncated_distcp", "truncated_metadata", "empty_rng", "empty_scheduler", "half_train_state"]
    for case in cases:
        it = ckpt / f"legacy_{case}"
        shutil.copytree(ckpt / "iter_0000002", it)
        (it / MANIFEST).unlink()
        where, damage = CORRUPTIONS[case]
        name = where(it)
        damage(it / name)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(it, engine.models(), engine.optimizer, engine.scheduler)
        msg = str(err.value)
        assert str(it) in msg and "Traceback" not in msg and "\n" not in msg, (case, msg)
        if case != "truncated_metadata" and case != "truncated_distcp":
            assert name in msg, (case, msg)


def test_checkpoint_dir_under_a_file_is_refused_before_models_load(killed_run, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("not a directory")
    t0 = time.time()
    res = _train(*_overrides(killed_run.tiny, f / "ckpt"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "checkpoint.dir" in res.stderr and str(f) in res.stderr and "Traceback" not in res.stderr
    assert "teacher general ready" not in res.stderr  # failed before any model was built
    assert time.time() - t0 < 120


def test_flipped_bytes_refused_by_name(killed_run, ckpt):
    bad = ckpt / "iter_0000002" / _distcp(ckpt / "iter_0000002")[0]
    _flip(bad)
    res = _train(*_overrides(killed_run.tiny, ckpt, f"checkpoint.resume={ckpt / 'iter_0000002'}", "train.steps=50"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert str(bad) in res.stderr and "corrupted" in res.stderr and "Traceback" not in res.stderr
    assert "teacher general ready" not in res.stderr


def test_auto_resume_falls_back_to_the_previous_checkpoint(killed_run, ckpt):
    bad = ckpt / "iter_0000002" / _distcp(ckpt / "iter_0000002")[0]
    _flip(bad)
    res = _train(*_overrides(killed_run.tiny, ckpt, "train.steps=2", "checkpoint.save_interval=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"checkpoint {ckpt / 'iter_0000002'} fails verification: {bad}" in res.stderr
    assert "falling back to the previous complete checkpoint" in res.stderr
    assert f"resumed from {ckpt / 'iter_0000001'} at step 1" in res.stderr
    state = json.loads((ckpt / "iter_0000002" / "train_state.json").read_text())
    assert state["step"] == 2  # step 2 retrained from iter_1 and saved over the corrupted checkpoint
    verify_checkpoint(ckpt / "iter_0000002")
    assert os.path.exists(ckpt / "iter_0000002" / MANIFEST)
