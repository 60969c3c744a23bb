"""Session fixture `slurm_cluster`: a real two-node Slurm cluster on loopback, started by tools/slurm_cluster.py.

The cluster is installed if needed, started in a short private directory under /tmp (unix socket paths are
length-limited and the munge/mysql users must traverse it), exported through ``SLURM_CONF`` for the whole
session and stopped at the end. When Slurm cannot be started the fixture FAILS with the daemon logs: a missing
cluster is a broken environment, not a reason to skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

TOOL = REPO / "tools" / "slurm_cluster.py"
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its state directory and the client environment (``SLURM_CONF``)."""

    root: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster and capture its text output."""
        proc = subprocess.run(
            cmd, check=False, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str) -> str:
        """Submit with ``sbatch --parsable`` and return the job id."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def sacct_states(self, job_id: str) -> list[str]:
        """The job's state per component (one for a plain job) as accounting (``sacct``) reports it."""
        out = self.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]  # "CANCELLED by 0" -> CANCELLED

    def wait(self, job_id: str, timeout: float = 60, components: int = 1) -> str:
        """Wait until ``sacct`` reports a terminal state for every component (at least `components` of them: the
        accounting of a heterogeneous job may list it whole before its components); return it ("A,B" if they
        differ)."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = self.sacct_states(job_id)
            if len(states) >= components and all(state in TERMINAL_STATES for state in states):
                return ",".join(sorted(set(states)))
            time.sleep(0.5)
        log = self.run("scontrol", "show", "job", job_id, check=False)
        raise AssertionError(f"job {job_id} not finished after {timeout}s (sacct: {states}):\n{log.stdout}")


def _tool(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], check=False, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    started = _tool("start", "--dir", str(root))
    if started.returncode != 0:
        _tool("stop", "--dir", str(root), timeout=120)
        pytest.fail(f"could not start the local Slurm cluster:\n{started.stdout}\n{started.stderr}", pytrace=False)
    env = {"SLURM_CONF": str(root / "slurm.conf")}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield SlurmCluster(root=root, env=env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stopped = _tool("stop", "--dir", str(root), timeout=300)
        if stopped.returncode == 0:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"stopping the Slurm cluster under {root} failed:\n{stopped.stderr}", file=sys.stderr)
