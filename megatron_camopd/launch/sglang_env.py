"""A Python environment of its own with real SGLang (the version `rollout/sglang_protocol.py` names), for CPU
machines: the suite's real-server tests and `camopd sbatch --cpu --server-backend sglang` start
`python -m sglang.launch_server` from it, as a cluster starts SGLang from its own environment.

`ensure_sglang_env()` builds it once per machine into the cache (`$CAMOPD_CACHE` or `~/.cache/megatron_camopd`,
a directory named after the version and a hash of the pinned requirements), under a file lock, and returns its
python. A finished build is marked by a stamp file written last; a directory without it (an interrupted build)
is removed and built again. `$CAMOPD_SGLANG_PYTHON` names an existing SGLang environment instead (its version is
checked). The pins are `launch/sglang/requirements-<version>.txt` (every runtime dependency, torch 2.14.1 and
torchvision 0.29.1 included); SGLang's wheel is installed after them with `--no-deps`: its CUDA-only kernels
(`sglang-kernel`, flashinfer, ...) cannot load on a CPU. On a CPU SGLang also imports a few kernels of
`sgl_kernel` when its modules load; the suite provides them (tests/sglang_cpu/), nothing here does.

    python -m megatron_camopd.launch.sglang_env      # prints the environment's python (builds it if needed)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from megatron_camopd.config.serving import SGLANG_VERSION
from megatron_camopd.convert.fixtures import cache_root
from megatron_camopd.errors import CamopdError

log = logging.getLogger("megatron_camopd.launch")

REQUIREMENTS = Path(__file__).with_name("sglang") / f"requirements-{SGLANG_VERSION}.txt"
STAMP = "camopd_sglang_env.json"  # written last: a finished build


def _digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:10]


def default_env_dir() -> Path:
    return cache_root() / f"sglang-{SGLANG_VERSION}-{_digest()}"


def installed_version(python: str | os.PathLike) -> str:
    """The SGLang version importable by `python` (CamopdError when none is)."""
    res = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('sglang'))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if res.returncode != 0:
        raise CamopdError(f"{python}: SGLang is not installed there ({res.stderr.strip()[-300:]})")
    return res.stdout.strip()


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise CamopdError(f"building the SGLang environment: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def _built(env: Path) -> bool:
    try:
        stamp = json.loads((env / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("sglang") == SGLANG_VERSION and stamp.get("requirements") == _digest()


def ensure_sglang_env(env_dir: str | os.PathLike | None = None) -> Path:
    """The python of an environment with SGLang `SGLANG_VERSION` (`$CAMOPD_SGLANG_PYTHON`, else built once into
    `env_dir` or `default_env_dir()`). Safe to call from several processes at once."""
    given = os.environ.get("CAMOPD_SGLANG_PYTHON")
    if given and env_dir is None:
        version = installed_version(given)
        if version != SGLANG_VERSION:
            raise CamopdError(
                f"CAMOPD_SGLANG_PYTHON={given} has SGLang {version}; this project is tested with {SGLANG_VERSION}"
            )
        return Path(given)
    env = Path(env_dir).expanduser().resolve() if env_dir is not None else default_env_dir()
    python = env / "bin" / "python"
    if _built(env):
        return python
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f".{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _built(env):  # another process finished it while we waited
            return python
        if env.exists():  # an interrupted build: a venv cannot be moved into place, so it is rebuilt where it is
            shutil.rmtree(env)
        log.info("building the SGLang %s environment in %s (once per machine, ~3 minutes)", SGLANG_VERSION, env)
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
        _pip(python, "-r", str(REQUIREMENTS))
        _pip(python, "--no-deps", f"sglang=={SGLANG_VERSION}")
        version = installed_version(python)
        if version != SGLANG_VERSION:
            raise CamopdError(f"{env}: installed SGLang {version}, expected {SGLANG_VERSION}")
        (env / STAMP).write_text(json.dumps({"sglang": SGLANG_VERSION, "requirements": _digest()}))
    return python


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        print(ensure_sglang_env())
    except CamopdError as exc:
        print(f"sglang_env: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
