"""`validate_main` (the `camopd validate` command) and `python -m megatron_camopd.config`: exit codes and output."""

from __future__ import annotations

import subprocess
import sys

import yaml
from megatron_camopd.config import validate_main

from .conftest import REPO, VALID


def test_valid_spec_prints_resolved_yaml(write_spec, capsys) -> None:
    assert validate_main([str(write_spec()), "method.rho_g=0.7"]) == 0
    out, err = capsys.readouterr()
    data = yaml.safe_load(out)
    assert data["method"]["rho_g"] == 0.7 and data["method"]["selection"] is True and err == ""


def test_invalid_spec_prints_one_error_line(write_spec, capsys) -> None:
    path = write_spec(VALID + "bogus: 1\n")
    assert validate_main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {path}:{len(VALID.splitlines()) + 1}: bogus: unknown key")


def test_bad_override_and_bad_arguments(write_spec, capsys) -> None:
    assert validate_main([str(write_spec()), "parallel.tq=2"]) == 2
    assert "parallel.tq: unknown key; did you mean 'tp'?" in capsys.readouterr().err
    assert validate_main([]) == 2
    assert validate_main([str(write_spec().parent / "missing.yaml")]) == 2
    assert "cannot read spec" in capsys.readouterr().err


def test_check_paths(write_spec, tmp_path, capsys) -> None:
    path = write_spec()
    assert validate_main([str(path), "--check-paths", "-q"]) == 2
    assert "model.hf_path" in capsys.readouterr().err
    for sub in ("models/student", "models/general", "data"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "general.jsonl").write_text("")
    (tmp_path / "data" / "domain.jsonl").write_text("")
    assert validate_main([str(path), "--check-paths", "-q"]) == 0
    assert capsys.readouterr().out == ""


def test_module_entry_point(write_spec) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "megatron_camopd.config", str(write_spec())],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["name"] == "unit"
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_camopd.config", str(write_spec()), "train.lr=-1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "error: override 'train.lr=-1': train.lr: must be > 0, got -1.0"
