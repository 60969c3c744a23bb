"""The launchers against a real Slurm: the hetjob sbatch script and `camopd launch --cluster slurm` train the tiny
spec with an HTTP teacher (a real SGLang 0.5.23 server, started by the launcher from `launcher.sglang_python`) on
one virtual node and the trainer on the other; a pre-timeout
USR1 makes the job checkpoint, requeue and finish with the same losses as an uninterrupted run; a teacher that
dies mid-run fails the job with a clear message instead of hanging.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

import yaml
from megatron_camopd.loop.metrics import read_metrics
from tests.helpers import REPO, repo_env, run_cli
from tests.sglang_servers import KERNEL_STANDIN, free_port

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm
STEPS = 4


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_camopd.demo.tiny import make_tiny_setup

    root = tmp_path_factory.mktemp("tiny") / "tiny_cpu"
    make_tiny_setup(str(root))
    return root


def write_spec(tiny_root: Path, run_dir: Path, sglang_python: Path, served_rollouts: bool = False) -> Path:
    """The tiny spec with ONE teacher (served over HTTP by the launcher: `serve`, on real SGLang with the test-only
    CPU kernels on its path), greedy rollouts (on CPU SGLang cannot honour sampling seeds), short timeouts and a
    checkpoint per step; `served_rollouts`: the student's rollouts on a real SGLang server too, which the trainer
    updates over a gloo weights-update group after every step, the servers as a job of their own (`dependency`
    topology: one het component per server group) that the trainer job finds through discovery. The two loopback
    nodes run several jobs at once, so no component asks for whole nodes."""
    spec = yaml.safe_load((REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml").read_text())
    spec["model"]["hf_path"] = str(tiny_root / "student")
    shared = {"exclusive": False}  # CPUs per task: what Slurm allocated (group_cpus)
    spec["teachers"] = {
        "general": {
            "hf_path": str(tiny_root / "teacher_general"),
            "timeout_s": 20.0,
            "retries": 1,
            "discovery_timeout_s": 60.0,
            "serve": {
                "nodes": 1,
                "gpus_per_node": 1,
                "tp": 1,
                "dp": 1,
                "resources": shared,
                "port": free_port(),  # SGLang listens on the spec's port; the two jobs share the loopback host
                "env": {"PYTHONPATH": str(KERNEL_STANDIN)},
            },
        }
    }
    spec["routing"] = {"general": "general", "domain": "general"}
    for stream in spec["data"]["streams"]:
        stream["path"] = str(tiny_root / "data" / Path(stream["path"]).name)
    spec["rollout"].update(prompts_per_step=4, max_new_tokens=16, temperature=0.0)
    spec["train"]["steps"] = STEPS
    spec["checkpoint"].update(dir=str(run_dir / "ckpt"), save_interval=1)
    spec["logging"].update(diagnostics=False)
    spec["launcher"] = {
        "nodes": 1,
        "gpus_per_node": 1,
        "time": "60:00",
        "log_dir": str(run_dir / "logs"),
        "health_timeout_s": 300,
        "shutdown_timeout_s": 60,
        "resources": shared,
        "sglang_python": str(sglang_python),
    }
    if served_rollouts:
        spec["launcher"]["topology"] = "dependency"
        spec["rollout"]["engine"] = "sglang"
        spec["rollout"]["sglang"] = {
            "nodes": 1,
            "gpus_per_node": 1,
            "resources": shared,
            "port": free_port(),
            "env": {"PYTHONPATH": str(KERNEL_STANDIN), "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"},
            "weight_sync": "distributed",
            "sync_timeout_s": 120.0,
            "discovery_timeout_s": 60.0,
        }
    path = run_dir / "spec.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def camopd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout, env=repo_env(), cwd=REPO)


def submit_hetjob(spec: Path) -> str:
    proc = camopd("sbatch", str(spec), "--cpu", "--submit")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("submitted hetjob job ")[1].split()[0]


def submit_dependency(spec: Path) -> tuple[str, str]:
    """(server job, trainer job) of a `dependency`-topology spec."""
    proc = camopd("sbatch", str(spec), "--cpu", "--submit")
    assert proc.returncode == 0, proc.stderr
    jobs = dict(re.findall(r"submitted (\w+) job (\d+)", proc.stdout))
    return jobs["teachers"], jobs["train"]


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))


def wait_until(what: str, predicate: Callable[[], object], timeout: float, log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log()}"
        time.sleep(0.5)


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "ckpt" / "metrics.jsonl")]


@pytest.fixture(scope="module")
def hetjobs(
    slurm_cluster: SlurmCluster, tiny_root: Path, sglang_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, Path]]:
    """Submitted together (they share the two nodes): the uninterrupted hetjob (teacher on SGLang, rollouts in
    process) and the to-be-preempted dependency-topology run (teacher and rollouts on SGLang sibling components);
    greedy, so both roll out the same tokens."""
    ref_dir, run_dir = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("preempted")
    servers, train = submit_dependency(write_spec(tiny_root, run_dir, sglang_python, served_rollouts=True))
    return {
        "reference": (submit_hetjob(write_spec(tiny_root, ref_dir, sglang_python)), ref_dir),
        "preempted": (train, run_dir),
        "servers": (servers, run_dir),
    }


@pytest.fixture(scope="module")
def reference_run(slurm_cluster: SlurmCluster, hetjobs: dict[str, tuple[str, Path]]) -> Path:
    job, run_dir = hetjobs["reference"]
    assert slurm_cluster.wait(job, timeout=500) == "COMPLETED", job_log(run_dir)
    return run_dir


def test_preempted_trainer_on_sglang_sibling_jobs_requeues_and_matches_the_uninterrupted_run(
    slurm_cluster: SlurmCluster, hetjobs: dict[str, tuple[str, Path]], request: pytest.FixtureRequest
) -> None:
    job, run_dir = hetjobs["preempted"]
    servers_job = hetjobs["servers"][0]
    metrics = run_dir / "ckpt" / "metrics.jsonl"
    wait_until(
        "the first step", lambda: metrics.exists() and metrics.read_text().strip(), 400, lambda: job_log(run_dir)
    )
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@N delivers
    assert slurm_cluster.wait(job, timeout=400) == "COMPLETED", job_log(run_dir)
    log = job_log(run_dir)
    assert "requeueing job" in log and "restart 1" in log, log
    resumed = log.split("(restart 1)", 1)[1]
    assert "step 1/" not in resumed and f"step {STEPS}/{STEPS}" in resumed, log  # resumed from the checkpoint
    runs = slurm_cluster.run("sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "State").stdout.split()
    assert "REQUEUED" in runs and runs[-1] == "COMPLETED"
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # every step's rollouts came from the SGLang server, synced with the trainer's weights over gloo; a sync the
    # preemption signal cut short is reported as such (the resumed job syncs before its first rollout)
    assert all(r.get("rollout_failed", 0) == 0 for r in rows), rows
    assert all(r.get("weight_sync_servers") == 1 or r.get("weight_sync_preempted") == 1 for r in rows), rows
    assert sum(r.get("weight_sync_preempted", 0) for r in rows) <= 1, rows
    assert "rollout servers ready: " in log and "teacher general ready: " in log, log
    assert "SGLang 0.5.23 (the tested release)" in log, log
    assert slurm_cluster.wait(servers_job, timeout=60) == "CANCELLED"  # the trainer ends its server job
    reference = request.getfixturevalue("reference_run")
    # served log-probs depend on how the server batched the requests, so losses vary ~1e-7 even between fresh runs
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-4, abs=1e-6)


def test_hetjob_trains_with_a_served_teacher(reference_run: Path) -> None:
    log = job_log(reference_run)
    assert len(losses(reference_run)) == STEPS, log
    assert "teacher general ready: " in log and "training finished" in log
    assert "teacher general ready (discovery, sglang)" in log  # reached through the discovery file


def server_pid(address: str) -> int:
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise AssertionError(f"no process listens on {address}")


def test_dead_teacher_fails_the_job_with_a_clear_message(
    slurm_cluster: SlurmCluster, tiny_root: Path, sglang_python: Path, tmp_path: Path
) -> None:
    job = submit_hetjob(write_spec(tiny_root, tmp_path, sglang_python))
    addr = lambda: list((tmp_path / "logs" / "discovery").glob("*/general.addr"))
    wait_until("the trainer's start", lambda: "trainer: 1 node(s)" in job_log(tmp_path), 200, lambda: job_log(tmp_path))
    started = time.monotonic()
    os.kill(server_pid(addr()[0].read_text().split()[0]), signal.SIGKILL)
    assert slurm_cluster.wait(job, timeout=120) == "FAILED", job_log(tmp_path)
    assert time.monotonic() - started < 90
    log = job_log(tmp_path)
    assert "servers of teacher general (het component 0) died; stopping the trainer" in log, log
    assert "ERROR: training stopped because a server died" in log


def test_submitit_launch_trains_and_cancels_the_teacher(
    slurm_cluster: SlurmCluster, tiny_root: Path, sglang_python: Path, tmp_path: Path
) -> None:
    spec = write_spec(tiny_root, tmp_path, sglang_python)
    proc = camopd("launch", str(spec), "--cluster", "slurm", "--cpu", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(losses(tmp_path)) == STEPS
    teacher_job = proc.stdout.split("teacher general: job ")[1].split()[0]
    assert slurm_cluster.wait(teacher_job, timeout=60) == "CANCELLED"
