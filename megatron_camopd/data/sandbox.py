"""Run untrusted Python (model-written code) in a constrained subprocess for the code verifier.

Isolation, in layers:
- a fresh temporary working directory (deleted afterwards), a minimal environment, ``python -I`` (isolated mode:
  no user site-packages, no PYTHON* variables, the cwd is not on ``sys.path``), a new session/process group;
- resource limits set in ``preexec_fn``: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (output and
  file size; stdout/stderr go to files in the temp dir so a flood of output cannot exhaust the parent), no core
  files; the wall-time limit kills the whole process group;
- network: when ``unshare -n`` works (root, or ``unshare -rn`` with unprivileged user namespaces) the program runs
  in a new, empty network namespace (no interface is up: every connect fails). This is what
  ``SandboxResult.isolation == "netns"`` reports. In every case a runner installs a ``sys.addaudithook`` guard
  (which cannot be removed from inside the interpreter) that raises on socket creation/connection, ``ctypes``
  library loading and process spawning; without a namespace (``isolation == "guard"``) that hook is the only
  network barrier, which is best-effort (it does not stop native extension modules).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_GUARD = r'''
import sys

_BLOCKED_PREFIXES = ("socket.", "ctypes.dlopen", "ctypes.dlsym", "subprocess.Popen", "os.system", "os.exec",
                     "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn")


def _camopd_sandbox_hook(event, args):
    if event.startswith(_BLOCKED_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")


if GUARD:
    sys.addaudithook(_camopd_sandbox_hook)
del _camopd_sandbox_hook
import runpy
sys.argv = ["solution.py"]
runpy.run_path("solution.py", run_name="__main__")
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    wall_time_s: float = 5.0
    memory_mb: int = 512
    cpu_time_s: int | None = None  # default: ceil(wall_time_s) + 1
    max_output_bytes: int = 4 * 1024 * 1024
    network_namespace: bool = True  # use ``unshare -n`` when available
    audit_guard: bool = True  # install the audit-hook guard (switch off only to test the namespace alone)


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    isolation: str  # "netns", "guard" (audit hook only) or "none"

    @property
    def ok(self) -> bool:
        """The program exited with status 0 within its limits."""
        return not self.timed_out and self.returncode == 0


@functools.lru_cache(maxsize=1)
def netns_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command prefix that creates a new network namespace here, or None if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    for prefix in ((exe, "-n"), (exe, "-r", "-n")):
        try:
            r = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return None


def _limit_child(lim: SandboxLimits) -> None:
    """Runs in the child between fork and exec: apply resource limits."""
    mem = lim.memory_mb * 1024 * 1024
    cpu = lim.cpu_time_s if lim.cpu_time_s is not None else int(lim.wall_time_s) + 2
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim.max_output_bytes, lim.max_output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``program`` as ``__main__`` in the sandbox with ``stdin``; never raises for the program's failures."""
    lim = limits or SandboxLimits()
    work = Path(tempfile.mkdtemp(prefix="camopd_sandbox_"))
    try:
        (work / "solution.py").write_text(program, encoding="utf-8")
        (work / "_runner.py").write_text(f"GUARD = {lim.audit_guard!r}\n" + _GUARD, encoding="utf-8")
        (work / "stdin.txt").write_text(stdin, encoding="utf-8")
        prefix = netns_prefix() if lim.network_namespace else None
        cmd = [*(prefix or ()), sys.executable, "-I", "-B", "_runner.py"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "PYTHONHASHSEED": "0"}
        timed_out = False
        with (work / "stdin.txt").open("rb") as fin, (work / "stdout.txt").open("wb") as fout, \
                (work / "stderr.txt").open("wb") as ferr:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr,
                                    start_new_session=True, preexec_fn=lambda: _limit_child(lim))
            try:
                rc: int | None = proc.wait(timeout=lim.wall_time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
                rc = None
        out = (work / "stdout.txt").read_bytes()[: lim.max_output_bytes].decode("utf-8", "replace")
        err = (work / "stderr.txt").read_bytes()[-20000:].decode("utf-8", "replace")
        isolation = "netns" if prefix else ("guard" if lim.audit_guard else "none")
        return SandboxResult(rc, out, err, timed_out, isolation)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
