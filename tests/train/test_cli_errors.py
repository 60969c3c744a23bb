"""User-facing errors of `camopd train` are one clear line and exit code 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import run_cli

from ._workers import TINY_SPEC, tiny_overrides


def _train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli("train", str(TINY_SPEC), *args, timeout=300, env=env)


def test_fp8_without_gpu_is_a_clear_error(tiny_root, tmp_path):
    res = _train(*tiny_overrides(tiny_root, tmp_path / "c"), "parallel.fp8.enabled=true")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "fp8" in res.stderr.lower() and "Traceback" not in res.stderr


def test_bad_override_names_the_field(tmp_path):
    res = _train(f"checkpoint.dir={tmp_path}", "method.rho_d=0")
    assert res.returncode == 2 and "method.rho_d" in res.stderr


def test_teacher_with_other_vocabulary_is_refused(tiny_root, tmp_path):
    from megatron_camopd.data.tokenizer import make_tiny_tokenizer
    from megatron_camopd.demo.tiny import make_tiny_model

    tok = make_tiny_tokenizer(tmp_path / "tok", alphabet="abcdefghij0123456789 +-=")
    other = make_tiny_model(tmp_path / "other", tok, seed=5)
    res = _train(*tiny_overrides(tiny_root, tmp_path / "c"), f"teachers.general.hf_path={other}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "teacher general" in res.stderr and "tokenizer" in res.stderr.lower()


def test_code_verifier_without_a_sandbox_is_refused_before_any_model_loads(tiny_root, tmp_path):
    import os
    import shutil

    bin_dir = tmp_path / "bin"  # the interpreter, and nothing else (no bwrap)
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    env = {**os.environ, "PATH": str(bin_dir)}
    assert shutil.which("bwrap", path=env["PATH"]) is None
    res = _train(*tiny_overrides(tiny_root, tmp_path / "c"), "data.streams.1.verifier=code", env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "bubblewrap" in res.stderr and "Traceback" not in res.stderr
    assert "teacher general ready" not in res.stderr and not (tmp_path / "c").exists()
