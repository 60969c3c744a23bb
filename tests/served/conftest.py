"""Fixtures for the served tests: a tiny setup, its general teacher converted to a camopd checkpoint, two
`camopd serve` replicas of that checkpoint and two of the student (subprocesses on port 0, found through
--ready-file), two real SGLang 0.5.23 servers of the student (`sglang_students`, from the environment the
project builds), and helpers to run `camopd train` as a subprocess on a spec written to tmp (`greedy=True`:
temperature 0, so real SGLang, which honours no sampling seed on a CPU, samples the tokens the in-process engine
does)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import yaml
from megatron_camopd.serve.server import LocalReplica, start_local_replicas
from tests.helpers import TINY_SPEC, cli_argv, repo_env, run_cli

STEPS, PROMPTS = 3, 4


def sub_env() -> dict[str, str]:
    """Environment of the subprocesses: this checkout importable, one torch thread each (2 shared cores)."""
    return repo_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_spec(
    tiny: Path, ckpt_dir: Path, teachers: dict[str, dict], out: Path, *, greedy: bool = False, **train: object
) -> Path:
    """The tiny example spec with absolute paths, the given teachers, a short run and `checkpoint.dir`."""
    spec = yaml.safe_load(TINY_SPEC.read_text())
    spec["model"]["hf_path"] = str(tiny / "student")
    spec["teachers"] = teachers
    for stream in spec["data"]["streams"]:
        stream["path"] = str(tiny / "data" / f"{stream['name']}.jsonl")
    spec["schedule"] = {"mode": "alternate", "n_g": 1}  # G, D, G: both teachers are used
    spec["rollout"].update(prompts_per_step=PROMPTS, max_new_tokens=8, **({"temperature": 0.0} if greedy else {}))
    spec["train"].update({"steps": STEPS, "micro_batch_size": 2, **train})
    spec["checkpoint"] = {"dir": str(ckpt_dir), "save_interval": 0, "resume": "never"}
    spec["logging"] = {"log_interval": 1, "progress": "off", "diagnostics": False}
    out.write_text(yaml.safe_dump(spec))
    return out


def start_train(spec: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cli_argv("train", str(spec)), env=sub_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 400.0) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"training did not finish in {timeout_s}s:\n{log.read_text()[-3000:]}") from None


def metrics(ckpt_dir: Path) -> list[dict]:
    path = ckpt_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_camopd.demo.tiny import make_tiny_setup

    return Path(make_tiny_setup(tmp_path_factory.mktemp("served_tiny")))


@pytest.fixture(scope="session")
def teacher_ckpt(tiny: Path) -> Path:
    """The general teacher as a camopd checkpoint root (hf/ + iter_0000000/), made by `camopd convert --from-hf`."""
    dst = tiny / "teacher_general_ckpt"
    run_cli("convert", "--from-hf", str(tiny / "teacher_general"), str(dst), timeout=300, env=sub_env(), check_rc=0)
    return dst


@pytest.fixture(scope="module")
def replicas(teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalReplica]]:
    reps = start_local_replicas(teacher_ckpt, tmp_path_factory.mktemp("replicas"), 2, env=sub_env())
    try:
        yield reps
    finally:
        for r in reps:
            r.stop()


@pytest.fixture(scope="session")
def student_replicas(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalReplica]]:
    """Two `camopd serve` rollout servers of the tiny student (HF dir, served with megatron-core)."""
    reps = start_local_replicas(tiny / "student", tmp_path_factory.mktemp("students"), 2, env=sub_env())
    try:
        yield reps
    finally:
        for r in reps:
            r.stop()


@pytest.fixture(scope="session")
def sglang_students(tiny: Path, sglang_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two real SGLang servers of the tiny student (their URLs); every user syncs its trainer's weights first."""
    from tests.sglang_servers import start_sglang_servers

    servers = start_sglang_servers(sglang_python, [tiny / "student"] * 2, tmp_path_factory.mktemp("sglang_students"))
    try:
        yield [s.url for s in servers]
    finally:
        for s in servers:
            s.stop()


def served_rollouts(spec_path: Path, urls: list[str], **sglang: object) -> Path:
    """Turn a spec written by `write_spec` into one whose rollouts come from the servers `urls`."""
    spec = yaml.safe_load(spec_path.read_text())
    spec["rollout"]["engine"] = "sglang"
    spec["rollout"]["sglang"] = {"urls": list(urls), "timeout_s": 120.0, "dead_deadline_s": 60.0, **sglang}
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path


def in_process_teachers(tiny: Path) -> dict[str, dict]:
    return {n: {"hf_path": str(tiny / "teacher_general")} for n in ("general", "domain")}
