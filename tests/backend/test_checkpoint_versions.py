"""Checkpoints across megatron-core versions: every checkpoint records the version that wrote it; one that the
running version cannot read fails with a message naming the checkpoint, the writing and the running version.

Where a second interpreter with another megatron-core exists ($CAMOPD_OTHER_MCORE_PYTHON, or the repository's
`.venv` / `.venv019`, as `.ci/run` builds them), a real checkpoint goes both ways: 0.16.1's loads on 0.19.2 (the
same weights), 0.19.2's is refused on 0.16.1 by that message (0.16 cannot read 0.19's format)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_camopd.backend.checkpoint import MCORE_VERSION as MCORE
from megatron_camopd.backend.checkpoint import VERSION_KEY, _versions, load_checkpoint, save_checkpoint
from megatron_camopd.errors import CheckpointError
from tests.helpers import repo_env

REPO = Path(__file__).resolve().parents[2]


def _release(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3])


def test_the_message_names_both_versions_and_what_to_do(tmp_path) -> None:
    (tmp_path / "common.pt").write_bytes(b"")
    assert _versions(tmp_path, {VERSION_KEY: MCORE}) == ""
    newer = _versions(tmp_path, {VERSION_KEY: "9.0.0"})
    assert f"written by megatron-core 9.0.0; this is megatron-core {MCORE}: load it with" in newer
    older = _versions(tmp_path, {VERSION_KEY: "0.1.0"})
    assert older == f" (written by megatron-core 0.1.0; this is megatron-core {MCORE})"
    assert "does not record" in _versions(tmp_path, {})


def test_an_unrecorded_checkpoint_without_common_pt_is_named_as_newer(tmp_path) -> None:
    msg = _versions(tmp_path, {}, running="0.16.1")  # as 0.16.1 sees a 0.19 checkpoint of before the record
    assert msg == (
        " (written by megatron-core >= 0.17 (it has no common.pt); this is megatron-core 0.16.1: load it with"
        " the megatron-core that wrote it, or a newer one)"
    )
    assert "does not record" in _versions(tmp_path, {}, running="0.19.2")  # 0.17+ writes no common.pt either


def _tiny_model(hf):
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch, build_model_chunks, transformer_config

    arch = ModelArch.from_hf_dir(hf)
    chunks = build_model_chunks(arch, transformer_config(arch), use_transformer_engine=False)
    load_hf_weights(chunks, hf, arch, 0, 1, 0, 1)
    return chunks


def test_the_version_is_recorded_and_a_failed_load_names_it(megatron_world, tiny_hf_dirs, tmp_path) -> None:
    path = save_checkpoint(tmp_path / "c", 1, _tiny_model(tiny_hf_dirs["qwen3"]))
    state_file = path / "train_state.json"
    state = json.loads(state_file.read_text())
    assert state[VERSION_KEY] == MCORE
    state_file.write_text(json.dumps({**state, VERSION_KEY: "9.0.0"}))  # as a newer megatron-core writes it
    (path / ".metadata").unlink()  # and its files are not what this version reads
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, _tiny_model(tiny_hf_dirs["qwen3"]), verify=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot load into this model: ") and "\n" not in msg
    assert f"written by megatron-core 9.0.0; this is megatron-core {MCORE}: load it with" in msg


def _version_of(python: str) -> str | None:
    try:
        res = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip().splitlines()[-1] if res.returncode == 0 and res.stdout.strip() else None


def _other_python() -> tuple[str, str] | None:
    named = os.environ.get("CAMOPD_OTHER_MCORE_PYTHON")
    cands = [named] if named else [str(REPO / v / "bin" / "python") for v in (".venv", ".venv019")]
    for py in cands:
        if Path(py).exists() and (v := _version_of(py)) and v != MCORE:
            return py, v
    return None


def _run(python: str, mode: str, root: Path, hf: Path) -> dict:
    res = subprocess.run(
        [python, "-W", "ignore", "-m", "tests.backend._xversion", mode, str(root), str(hf)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        env=repo_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_a_checkpoint_goes_between_the_two_versions(tiny_hf_dirs, tmp_path) -> None:
    other = _other_python()
    if other is None:
        pytest.skip("no second interpreter with another megatron-core ($CAMOPD_OTHER_MCORE_PYTHON, .venv019)")
    pythons = {MCORE: sys.executable, other[1]: other[0]}
    old, new = sorted(pythons, key=_release)
    hf = tiny_hf_dirs["qwen3"]
    written = {v: _run(pythons[v], "save", tmp_path / v, hf) for v in (old, new)}
    for v, out in written.items():
        assert out["megatron_core"] == v
        assert json.loads((Path(out["path"]) / "train_state.json").read_text())[VERSION_KEY] == v
    forward = _run(pythons[new], "load", tmp_path / old, hf)  # newer reads older: the same weights
    assert forward.get("error") is None and forward["step"] == 1
    assert forward["digest"] == pytest.approx(written[old]["digest"], rel=0, abs=1e-9)
    shutil.copytree(tmp_path / new, tmp_path / "back")
    back = _run(pythons[old], "load", tmp_path / "back", hf)
    if _release(old) < (0, 17) <= _release(new):  # 0.16 cannot read 0.19's format: said so, by name
        msg = back["error"]
        assert msg.startswith(f"{tmp_path / 'back' / 'iter_0000001'}: cannot load into this model") and "\n" not in msg
        assert f"written by megatron-core {new}; this is megatron-core {old}: load it with" in msg
    else:
        assert back.get("error") is None and back["digest"] == pytest.approx(written[new]["digest"], abs=1e-9)
