"""`DRY_RUN=1 bash tools/gpu_check.sh`: the GPU acceptance run, on this CPU machine. Every check it can run on a
CPU runs (the "GPU" ones on the CPU in bf16, the multi-GPU ones on gloo ranks) and passes; only the TransformerEngine
/ FP8 check is skipped, with its reason. Before this test, nothing ran the dry run and it broke unnoticed (a renamed
`LossSpec` field stopped it at its third check). About 8 minutes on 2 cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

CHECKS = [
    "qwen3-step-loss",
    "camopd-plan",
    "sampled-rollout",
    "rollout-train-rollout",
    "tp2",
    "tp2-pp2",
    "distopt-save-load",
    "async-pipeline",
    "bench-step",
    "bench-rollout",
    "bench-overlap",
]


@pytest.mark.multiproc
@pytest.mark.timeout(1800)
def test_gpu_check_dry_run_passes_every_check_it_can_run(tmp_path: Path) -> None:
    # the suite runs tests/backend itself (its multi-rank tests too): the dry run's copy of them is skipped
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    env["SKIP"] = "backend-tests"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=1750
    )
    out = proc.stdout
    assert "GPU check summary" in out, (out[-3000:], proc.stderr[-3000:])
    summary = out[out.index("GPU check summary") :]
    status = dict((m.group(2), m.group(1)) for m in re.finditer(r"^\s+(PASS|FAIL|SKIP) (\S+)", summary, re.M))
    failed = [name for name, s in status.items() if s == "FAIL"]
    logs = {name: (tmp_path / "out" / f"{name}.log") for name in failed}
    tails = {n: p.read_text()[-2000:] if p.exists() else "(no log)" for n, p in logs.items()}
    assert not failed and proc.returncode == 0, (summary, tails)
    assert all(status.get(c) == "PASS" for c in CHECKS), summary
    assert status["backend-tests"] == "SKIP"
    assert status["machine"] == status["megatron-core"] == "SKIP"  # DRY_RUN: no CUDA, the installed megatron-core
    assert status["te-fp8"] == "SKIP" and "TransformerEngine is not installed" in summary
