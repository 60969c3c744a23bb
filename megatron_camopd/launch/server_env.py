"""A Python environment of its own for a serving engine (SGLang, vLLM), built once per machine from pinned files.

`ServerEnv.ensure()` builds it into the cache (`$CAMOPD_CACHE` or `~/.cache/megatron_camopd`, a directory named
after the engine, its version and a hash of the pinned requirements), under a file lock, and returns its python:
a venv, `pip install -r <requirements>`, then the engine's own wheel with `--no-deps` (its CUDA-only extras cannot
load on a CPU). A finished build is marked by a stamp file written last; a directory without it (an interrupted
build) is removed and built again. An environment variable (`$CAMOPD_SGLANG_PYTHON`, `$CAMOPD_VLLM_PYTHON`) names
an existing environment instead; its version is checked. `launch/sglang_env.py` and `launch/vllm_env.py` are the
two instances and their command lines.
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
from dataclasses import dataclass
from pathlib import Path

from megatron_camopd.convert.fixtures import cache_root
from megatron_camopd.errors import CamopdError

log = logging.getLogger("megatron_camopd.launch")


@dataclass(frozen=True)
class ServerEnv:
    """One engine's environment: `engine` (its stamp key and directory prefix), `version`, the distributions that
    may provide it (the first found is checked), the wheel installed with --no-deps, the pinned requirements and
    the variable naming an existing environment."""

    engine: str
    version: str
    dists: tuple[str, ...]
    wheel: str
    requirements: Path
    env_var: str
    minutes: str  # for the build's log line

    def digest(self) -> str:
        return hashlib.sha256(self.requirements.read_bytes()).hexdigest()[:10]

    def default_dir(self) -> Path:
        return cache_root() / f"{self.engine}-{self.version}-{self.digest()}"

    @property
    def stamp(self) -> str:
        return f"camopd_{self.engine}_env.json"

    def installed_version(self, python: str | os.PathLike) -> str:
        """The engine version importable by `python` (CamopdError when none is)."""
        probe = (
            "import importlib.metadata as m\n"
            f"for d in {list(self.dists)!r}:\n"
            "    try:\n        print(m.version(d)); break\n"
            "    except m.PackageNotFoundError:\n        pass\n"
            "else:\n    raise SystemExit('not installed: ' + ', '.join(" + repr(list(self.dists)) + "))\n"
        )
        try:
            res = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, check=False)
        except OSError as exc:  # no such file, not executable
            where = f" (${self.env_var})" if os.environ.get(self.env_var) == str(python) else ""
            raise CamopdError(f"{python}{where}: cannot run it as a python ({exc.strerror})") from None
        if res.returncode != 0:
            raise CamopdError(f"{python}: {self.engine} is not installed there ({res.stderr.strip()[-300:]})")
        return res.stdout.strip()

    def _pip(self, python: Path, *args: str) -> None:
        cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise CamopdError(f"building the {self.engine} environment: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")

    def built(self, env: Path) -> bool:
        try:
            stamp = json.loads((env / self.stamp).read_text())
        except (OSError, ValueError):
            return False
        return stamp.get(self.engine) == self.version and stamp.get("requirements") == self.digest()

    def ensure(self, env_dir: str | os.PathLike | None = None) -> Path:
        """The python of an environment with the engine at `version` (`$<env_var>`, else built once into `env_dir`
        or `default_dir()`). Safe to call from several processes at once."""
        given = os.environ.get(self.env_var)
        if given and env_dir is None:
            found = self.installed_version(given)
            if found != self.version:
                raise CamopdError(
                    f"{self.env_var}={given} has {self.engine} {found}; this project is tested with {self.version}"
                )
            return Path(given)
        env = Path(env_dir).expanduser().resolve() if env_dir is not None else self.default_dir()
        python = env / "bin" / "python"
        if self.built(env):
            return python
        env.parent.mkdir(parents=True, exist_ok=True)
        with open(env.parent / f".{env.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.built(env):  # another process finished it while we waited
                return python
            if env.exists():  # an interrupted build: a venv cannot be moved into place, so it is rebuilt where it is
                shutil.rmtree(env)
            log.info(
                "building the %s %s environment in %s (once per machine, ~%s minutes)",
                self.engine,
                self.version,
                env,
                self.minutes,
            )
            venv.EnvBuilder(with_pip=True, clear=True).create(env)
            self._pip(python, "-r", str(self.requirements))
            self._pip(python, "--no-deps", f"{self.wheel}=={self.version}")
            found = self.installed_version(python)
            if found != self.version:
                raise CamopdError(f"{env}: installed {self.engine} {found}, expected {self.version}")
            (env / self.stamp).write_text(json.dumps({self.engine: self.version, "requirements": self.digest()}))
        return python

    def main(self) -> int:
        """`python -m megatron_camopd.launch.<engine>_env`: print the environment's python, building it if needed."""
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        try:
            print(self.ensure())
        except CamopdError as exc:
            print(f"{self.engine}_env: error: {exc}", file=sys.stderr)
            return 2
        return 0
