"""A Python environment of its own with real SGLang (the version `rollout/sglang_protocol.py` names), for CPU
machines: the suite's real-server tests and `camopd sbatch --cpu --server-backend sglang` start
`python -m sglang.launch_server` from it, as a cluster starts SGLang from its own environment.

`ensure_sglang_env()` builds it once per machine into the cache (`$CAMOPD_CACHE` or `~/.cache/megatron_camopd`,
a directory named after the version and a hash of the pinned requirements), under a file lock, and returns its
python (`launch/server_env.py`). `$CAMOPD_SGLANG_PYTHON` names an existing SGLang environment instead (its version
is checked). The pins are `launch/sglang/requirements-<version>.txt` (every runtime dependency, torch 2.14.1 and
torchvision 0.29.1 included); SGLang's wheel is installed after them with `--no-deps`: its CUDA-only kernels
(`sglang-kernel`, flashinfer, ...) cannot load on a CPU. On a CPU SGLang also imports a few kernels of
`sgl_kernel` when its modules load; the suite provides them (tests/sglang_cpu/), nothing here does.

    python -m megatron_camopd.launch.sglang_env      # prints the environment's python (builds it if needed)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_camopd.config.serving import SGLANG_VERSION
from megatron_camopd.launch.server_env import ServerEnv

SGLANG_ENV = ServerEnv(
    engine="sglang",
    version=SGLANG_VERSION,
    dists=("sglang",),
    wheel="sglang",
    requirements=Path(__file__).with_name("sglang") / f"requirements-{SGLANG_VERSION}.txt",
    env_var="CAMOPD_SGLANG_PYTHON",
    minutes="3",
)
REQUIREMENTS = SGLANG_ENV.requirements


def default_env_dir() -> Path:
    return SGLANG_ENV.default_dir()


def installed_version(python: str | os.PathLike) -> str:
    """The SGLang version importable by `python` (CamopdError when none is)."""
    return SGLANG_ENV.installed_version(python)


def ensure_sglang_env(env_dir: str | os.PathLike | None = None) -> Path:
    """The python of an environment with SGLang `SGLANG_VERSION` (`$CAMOPD_SGLANG_PYTHON`, else built once into
    `env_dir` or `default_env_dir()`). Safe to call from several processes at once."""
    return SGLANG_ENV.ensure(env_dir)


def main() -> int:
    return SGLANG_ENV.main()


if __name__ == "__main__":
    sys.exit(main())
