"""Run untrusted Python (model-written code) for the code verifier inside a bubblewrap (``bwrap``) sandbox.

Why: the code verifier executes whatever the student writes. Nothing here relies on the program cooperating (no
audit hooks, no in-process guards); the kernel enforces every boundary:

- **user**: when the trainer runs as root, bwrap itself is started as uid/gid 65534 (nobody, no supplementary
  groups) and the program runs as 65534 inside a new user namespace with no capabilities; otherwise it runs as
  the caller's uid, still capability-free. It can signal no process outside its sandbox.
- **filesystem**: a fresh root holding only ``/usr`` (read-only), the host's ``/bin``, ``/lib*`` symlinks (or
  read-only binds where they are real directories), a new ``/proc`` of its own pid namespace, a minimal ``/dev``,
  a private size-capped tmpfs ``/tmp`` and an empty size-capped tmpfs work dir ``/work`` holding only
  ``solution.py``. No ``/etc`` (no passwd), no ``/root``/``/home``, no repository, no venv: the interpreter is the
  system ``python3`` under ``/usr`` run with ``-I -S -B`` (a Python outside ``/usr`` gets only its own installation
  prefix bound read-only). Everything written disappears with the sandbox.
- **namespaces** (``--unshare-all``): no network at all (no interface, no loopback reachable from the host, no
  host Unix sockets since no host path is bound), own pid/ipc/uts/cgroup namespaces, ``--new-session`` (no
  controlling-terminal injection) and ``--die-with-parent``.
- **limits**, set by the runner before the program's first line (kernel rlimits, irreversible from inside):
  address space, CPU time, file size (also caps stdout/stderr, which go to files of the parent), process count
  (counted per user namespace, so a fork bomb stays inside), open files, no core files; tmpfs sizes; wall time.
- **cleanup**: bwrap's inner process is the init of the sandbox's pid namespace; when it dies the kernel kills
  every process left inside (a ``setsid`` daemon included). The parent pins that init with a pidfd as soon as
  bwrap reports it (``--info-fd``), and on every exit path (normal exit, timeout, exception) SIGKILLs bwrap's
  process group and the init, then waits for the init to be gone, before reaping bwrap (so no id was reused).

There is no unconfined fallback: if ``bwrap`` is missing or cannot create its namespaces here,
``SandboxUnavailable`` says what to install or enable, and the code verifier refuses to score.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from megatron_camopd.errors import CamopdError

SANDBOX_UID = 65534  # nobody
WORK = "/work"
_INSTALL_HINT = "install bubblewrap: `apt-get install -y bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`"

# Runs first inside the sandbox (``python -I -S -B -c``): apply the kernel limits, then run the solution.
_RUNNER = r"""
import resource, runpy, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
del name, value
sys.argv = ["solution.py"]
runpy.run_path("{work}/solution.py", run_name="__main__")
"""


class SandboxUnavailable(CamopdError):
    """bubblewrap is missing or cannot create its namespaces here: model-written code is not run at all."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits and tools of one sandboxed run (the one typed config of the sandbox)."""

    wall_time_s: float = 5.0
    memory_mb: int = 512  # RLIMIT_AS
    cpu_time_s: int | None = None  # RLIMIT_CPU; default: int(wall_time_s) + 2
    max_output_bytes: int = 4 * 1024 * 1024  # RLIMIT_FSIZE: stdout, stderr and any file written
    max_processes: int = 32  # RLIMIT_NPROC inside the sandbox's user namespace (threads count)
    max_open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_mb: int = 32  # size of each of /tmp and the work dir
    bwrap: str = "bwrap"  # name on PATH or absolute path of bubblewrap
    python: str | None = None  # interpreter inside the sandbox; default /usr/bin/python3, else this Python


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        """The program exited with status 0 within its limits."""
        return not self.timed_out and self.returncode == 0


@dataclass(frozen=True)
class _Plan:
    """What a probe found to work: the bwrap executable, the interpreter, the fixed bwrap arguments."""

    bwrap: str
    python: str
    args: tuple[str, ...]
    drop_to_nobody: bool


def _interpreter(python: str | None) -> tuple[str, tuple[str, ...]]:
    """(interpreter path, host dirs to bind read-only for it besides /usr)."""
    if python is None:
        if os.access("/usr/bin/python3", os.X_OK):
            return "/usr/bin/python3", ()
        python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    real = os.path.realpath(shutil.which(python) or python)
    if not os.access(real, os.X_OK):
        raise SandboxUnavailable(
            f"sandbox: interpreter {python!r} not found or not executable "
            "(SandboxLimits.python; install python3 under /usr)"
        )
    if real.startswith("/usr/"):
        return real, ()
    prefix = os.path.dirname(os.path.dirname(real))  # <prefix>/bin/python3.x -> <prefix>
    return real, (prefix,)


def _root_args() -> list[str]:
    """A minimal read-only root: /usr and the /bin and /lib* entries of the host."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _bwrap_args(lim: SandboxLimits, extra_ro: tuple[str, ...]) -> tuple[str, ...]:
    tmpfs = str(lim.tmpfs_mb * 1024 * 1024)
    interpreter = [a for d in extra_ro for a in ("--ro-bind", d, d)]  # after the tmpfs mounts: not hidden
    return (
        *_root_args(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        tmpfs,
        "--tmpfs",
        "/tmp",
        "--perms",
        "0700",
        "--size",
        tmpfs,
        "--tmpfs",
        WORK,
        *interpreter,
        "--chdir",
        WORK,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--hostname",
        "sandbox",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "HOME",
        WORK,
    )


def _popen_user(drop: bool) -> dict:
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if drop else {}


@functools.lru_cache(maxsize=8)
def _probe(bwrap: str, python: str | None, tmpfs_mb: int) -> _Plan:
    exe = shutil.which(bwrap)
    if exe is None:
        raise SandboxUnavailable(
            f"sandbox: bubblewrap not found ({bwrap!r} is not an executable on PATH); "
            f"the code verifier runs model-written code only inside it: {_INSTALL_HINT}"
        )
    py, extra = _interpreter(python)
    args = _bwrap_args(SandboxLimits(tmpfs_mb=tmpfs_mb), extra)
    drop = os.geteuid() == 0
    try:
        r = subprocess.run(
            [exe, *args, "--", py, "-I", "-S", "-B", "-c", "print('camopd-sandbox-ok')"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            **_popen_user(drop),
        )
        detail = r.stderr.strip() or f"exit status {r.returncode}"
        ok = r.returncode == 0 and r.stdout.strip() == "camopd-sandbox-ok"
    except (OSError, subprocess.TimeoutExpired) as exc:
        detail, ok = str(exc), False
    if not ok:
        if "source path" in detail or "execvp" in detail:  # the sandbox user cannot reach the interpreter
            hint = (
                f"the interpreter {py} and its installation must be readable by uid {SANDBOX_UID} when the "
                "trainer runs as root; use a system python3 under /usr (SandboxLimits.python)"
            )
        else:
            hint = (
                "it needs user namespaces (sysctl user.max_user_namespaces > 0, "
                "kernel.unprivileged_userns_clone=1 where that exists; in a container, a seccomp/AppArmor "
                "profile that allows them)"
            )
        raise SandboxUnavailable(
            f"sandbox: bubblewrap ({exe}) cannot create its sandbox here ({detail}): "
            f"{hint}. Model-written code is not run unconfined."
        )
    return _Plan(exe, py, args, drop)


def ensure_available(limits: SandboxLimits | None = None) -> None:
    """Raise ``SandboxUnavailable`` unless bubblewrap can sandbox the interpreter here (cached probe)."""
    lim = limits or SandboxLimits()
    _probe(lim.bwrap, lim.python, lim.tmpfs_mb)


def _rlimits(lim: SandboxLimits) -> list[tuple[str, int]]:
    cpu = lim.cpu_time_s if lim.cpu_time_s is not None else int(lim.wall_time_s) + 2
    return [
        ("RLIMIT_AS", lim.memory_mb * 1024 * 1024),
        ("RLIMIT_CPU", cpu),
        ("RLIMIT_FSIZE", lim.max_output_bytes),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NPROC", lim.max_processes),
        ("RLIMIT_NOFILE", lim.max_open_files),
    ]


def _file_with(data: str) -> IO[bytes]:
    f = tempfile.TemporaryFile()  # noqa: SIM115 -- the caller uses it as a context manager
    f.write(data.encode("utf-8"))
    f.seek(0)
    return f


def _ready(fds: list[int], timeout: float) -> set[int]:
    """The descriptors of `fds` readable (or hung up) within `timeout` seconds; poll, not select: a long-lived
    process may hold descriptors numbered past select's 1024."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return {fd for fd, _ in poller.poll(max(timeout, 0.0) * 1000.0)}


def _wait_fd(fd: int, timeout: float) -> bool:
    return fd in _ready([fd], timeout)


def _pin_init(info_fd: int, bwrap_pid: int, bwrap_pidfd: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's pid-namespace init, taken as soon as bwrap reports it (``--info-fd``).

    Safe against pid reuse: the pidfd is kept only if, after opening it, the process is alive and its parent is
    still our unreaped bwrap (so that pid named the init when it was opened). None if bwrap exited first."""
    data = b""
    while True:
        ready = _ready([info_fd, bwrap_pidfd], deadline - time.monotonic())
        if info_fd not in ready:
            return None  # bwrap exited or the deadline passed before it reported the init
        chunk = os.read(info_fd, 4096)
        if not chunk:
            return None
        data += chunk
        try:
            init = int(json.loads(data)["child-pid"])
            break
        except (ValueError, KeyError, TypeError):
            continue
    try:
        pidfd = os.pidfd_open(init)
    except OSError:
        return None
    try:
        status = Path(f"/proc/{init}/status").read_text()
        ppid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
    except (OSError, StopIteration, ValueError):
        ppid = -1
    if ppid != bwrap_pid or _wait_fd(pidfd, 0.0):
        os.close(pidfd)
        return None
    return pidfd


def _kill_sandbox(pgid: int, init_pidfd: int | None) -> None:
    """SIGKILL bwrap's process group and the namespace init, then wait until the init has exited, which the
    kernel allows only after every other process of its pid namespace is gone. Called before bwrap (the group
    leader) is reaped, so the group id cannot have been reused; a pidfd never names another process."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if init_pidfd is not None:
        try:
            signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)
        except OSError:
            pass
        _wait_fd(init_pidfd, 10.0)


def run_python(program: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``program`` as ``__main__`` in the sandbox with ``stdin``.

    Never raises for the program's failures; raises ``SandboxUnavailable`` when no sandbox can be made here.
    """
    lim = limits or SandboxLimits()
    plan = _probe(lim.bwrap, lim.python, lim.tmpfs_mb)
    runner = _RUNNER.format(limits=_rlimits(lim), work=WORK)
    with (
        _file_with(program) as src,
        _file_with(stdin) as fin,
        tempfile.TemporaryFile() as fout,
        tempfile.TemporaryFile() as ferr,
    ):
        info_r, info_w = os.pipe()
        cmd = [
            plan.bwrap,
            *plan.args,
            "--info-fd",
            str(info_w),
            "--ro-bind-data",
            str(src.fileno()),
            f"{WORK}/solution.py",
            "--",
            plan.python,
            "-I",
            "-S",
            "-B",
            "-c",
            runner,
        ]
        timed_out = True
        deadline = time.monotonic() + lim.wall_time_s
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                pass_fds=(src.fileno(), info_w),
                start_new_session=True,
                **_popen_user(plan.drop_to_nobody),
            )
            os.close(info_w)
            info_w = -1
            bwrap_fd = os.pidfd_open(proc.pid)
            init_fd = None
            try:  # wait for bwrap's exit without reaping it, so its group id stays reserved
                init_fd = _pin_init(info_r, proc.pid, bwrap_fd, deadline)
                timed_out = not _wait_fd(bwrap_fd, deadline - time.monotonic())
            finally:  # every exit path: kill the group and the namespace, wait for both, then reap bwrap
                _kill_sandbox(proc.pid, init_fd)
                for fd in (bwrap_fd, init_fd):
                    if fd is not None:
                        os.close(fd)
                rc = proc.wait()
        finally:
            os.close(info_r)
            if info_w >= 0:
                os.close(info_w)
        fout.seek(0)
        ferr.seek(0)
        out = fout.read(lim.max_output_bytes).decode("utf-8", "replace")
        err = ferr.read()[-20000:].decode("utf-8", "replace")
    return SandboxResult(None if timed_out else rc, out, err, timed_out)
