"""Escape attempts on the code verifier's sandbox (each one worked against the earlier audit-hook sandbox).

Every attack program starts by switching off any in-process guard (walking ``sys._getframe()`` and emptying a
runner's blocked prefixes), so only kernel isolation can stop what follows. Host-side effects are checked from
outside: canary files, listeners the test opens, a victim process, and ``/proc`` scanned for a unique marker.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import megatron_camopd
from megatron_camopd.data.sandbox import SandboxLimits, SandboxUnavailable, ensure_available, run_python
from megatron_camopd.data.verifiers import code, get_verifier
from megatron_camopd.errors import CamopdError

pytestmark = pytest.mark.timeout(120)

UNHOOK = """
import sys
_f = sys._getframe()
while _f is not None:
    if "_BLOCKED_PREFIXES" in _f.f_globals:
        _f.f_globals["_BLOCKED_PREFIXES"] = ("nothing.is.blocked",)
    _f = _f.f_back
"""

FORK_EXEC = (
    UNHOOK
    + """
import _posixsubprocess, os
def sh(cmd):
    er, ew = os.pipe()
    args = [[b"/bin/sh", b"-c", cmd.encode()], [b"/bin/sh"], True, (ew,), None, None, -1, -1, -1, -1, -1, -1,
            er, ew, True, False, -1, None, None, None, -1, None, False]
    pid = _posixsubprocess.fork_exec(*args)  # no audit event, no subprocess module
    os.close(ew); os.read(er, 64); os.close(er)
    os.waitpid(pid, 0)
"""
)


@pytest.fixture()
def canary() -> Iterator[tuple[Path, str]]:
    """A world-readable secret and a world-writable dir outside the sandbox: only mount isolation hides them."""
    d = Path(tempfile.mkdtemp(prefix="camopd_canary_"))
    d.chmod(0o777)
    secret = f"canary-{uuid.uuid4().hex}"
    (d / "secret.txt").write_text(secret)
    (d / "secret.txt").chmod(0o644)
    yield d, secret
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _listen_tcp() -> tuple[socket.socket, list[bytes], threading.Event]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    return srv, *_serve(srv)


def _serve(srv: socket.socket) -> tuple[list[bytes], threading.Event]:
    srv.listen(4)
    srv.settimeout(0.1)
    got: list[bytes] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                got.append(conn.recv(100) or b"<connected>")

    threading.Thread(target=loop, daemon=True).start()
    return got, stop


def _survivors(marker: str) -> list[int]:
    """Pids of host processes whose command line contains ``marker`` (pid namespaces hide nothing from here)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_guard_switched_off_then_subprocess_reads_nothing(canary: tuple[Path, str]) -> None:
    d, secret = canary
    prog = (
        UNHOOK + f"import subprocess\nprint(subprocess.run(['cat', '{d}/secret.txt', '/etc/passwd'], "
        "capture_output=True, text=True).stdout)\nprint('spawned')\n"
    )
    res = run_python(prog)
    assert res.ok and "spawned" in res.stdout  # spawning works, but inside the sandbox
    assert secret not in res.stdout and "root:" not in res.stdout


def test_posixsubprocess_fork_exec_shell_is_confined(canary: tuple[Path, str]) -> None:
    d, secret = canary
    prog = FORK_EXEC + f"sh('echo sh-ran; id -u; cat {d}/secret.txt; echo x > {d}/forkexec; cat /etc/passwd')\n"
    res = run_python(prog)
    assert res.ok and "sh-ran\n65534\n" in res.stdout, res
    assert secret not in res.stdout and "root:" not in res.stdout
    assert not (d / "forkexec").exists()


def test_host_files_are_not_visible(canary: tuple[Path, str]) -> None:
    d, secret = canary
    paths = [
        "/etc/passwd",
        "/etc/shadow",
        "/root/.bashrc",
        "/root/.profile",
        f"{d}/secret.txt",
        str(Path(megatron_camopd.__file__)),
        f"{sys.prefix}/pyvenv.cfg",
    ]
    prog = (
        UNHOOK + f"import json, os\nout = {{}}\nfor p in {paths!r}:\n    try:\n"
        "        out[p] = 'READ:' + open(p).read()\n    except OSError as e:\n"
        "        out[p] = 'ERR:' + type(e).__name__\n"
        "out['ls'] = sorted(os.listdir('/'))\nprint(json.dumps(out))\n"
    )
    res = run_python(prog)
    assert res.ok, res
    out = json.loads(res.stdout)
    assert all(out[p] == "ERR:FileNotFoundError" for p in paths), out
    assert not {"etc", "root", "home", "mnt", "var"} & set(out["ls"]), out["ls"]
    assert secret not in res.stdout


def test_writes_outside_the_work_dir_do_not_persist(canary: tuple[Path, str]) -> None:
    d, _ = canary
    name = f"camopd_escape_{uuid.uuid4().hex}"
    pkg = Path(megatron_camopd.__file__).parent
    targets = [pkg, Path(sys.prefix), Path("/etc/cron.d"), d, Path("/tmp"), Path("/usr/lib")]
    prog = (
        UNHOOK + f"import os\nfor t in {[str(t) for t in targets]!r} + ['/work', '/tmp']:\n    try:\n"
        f"        os.makedirs(t, exist_ok=True); open(os.path.join(t, {name!r}), 'w').write('x')\n"
        "        print('wrote', t)\n    except OSError as e:\n        print('refused', t, e)\n"
    )
    res = run_python(prog)
    assert res.ok and "wrote /work" in res.stdout, res
    assert not [t for t in targets if (t / name).exists()]
    again = run_python("import os\nprint(os.listdir('/work'), os.listdir('/tmp'))\n")
    assert again.stdout.strip() == "['solution.py'] []"  # nothing persisted from the earlier run


def test_unix_sockets_of_the_host_are_unreachable(canary: tuple[Path, str]) -> None:
    d, _ = canary
    path = d / "sock"
    abstract = f"\0camopd-test-{uuid.uuid4().hex}"
    servers = []
    for addr in (str(path), abstract):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(addr)
        servers.append((srv, *_serve(srv)))
    path.chmod(0o777)
    prog = (
        UNHOOK + f"import socket\nfor a in {[str(path), abstract]!r}:\n    try:\n"
        "        s = socket.socket(socket.AF_UNIX); s.connect(a); s.sendall(b'leak'); print('sent', a)\n"
        "    except OSError as e:\n        print('refused', type(e).__name__)\n"
    )
    try:
        res = run_python(prog)
        time.sleep(0.3)
        assert res.ok and res.stdout.count("refused") == 2, res
        assert all(got == [] for _, got, _ in servers)
    finally:
        for srv, _, stop in servers:
            stop.set()
            srv.close()
        path.unlink()


def test_tcp_loopback_listener_is_unreachable() -> None:
    srv, got, stop = _listen_tcp()
    port = srv.getsockname()[1]
    prog = (
        UNHOOK + f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        ".sendall(b'leak'); print('sent')\nexcept OSError as e:\n    print('refused', e)\n"
    )
    try:
        res = run_python(prog)
        assert code(prog, {"tests": [{"stdin": "", "stdout": "sent"}]}) == 0.0
        time.sleep(0.3)
        assert res.ok and "refused" in res.stdout and got == []
    finally:
        stop.set()
        srv.close()


def test_cannot_signal_a_host_process() -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prog = (
            UNHOOK + f"import os, signal\nfor pid in ({victim.pid}, {os.getpid()}):\n    try:\n"
            "        os.kill(pid, signal.SIGKILL); print('killed', pid)\n"
            "    except OSError as e:\n        print('refused', type(e).__name__)\n"
        )
        res = run_python(prog)
        time.sleep(0.2)
        assert res.ok and victim.poll() is None, res
    finally:
        victim.kill()
        victim.wait()


def test_password_file_answer_does_not_score() -> None:
    first_field = Path("/etc/passwd").read_text().split(":")[0]  # what the program would print unconfined
    prog = "print(open('/etc/passwd').read().split(':')[0])"
    assert code(prog, {"tests": [{"stdin": "", "stdout": first_field}]}) == 0.0
    assert code(f"print({first_field!r})", {"tests": [{"stdin": "", "stdout": first_field}]}) == 1.0


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_no_process_outlives_the_run(ending: str) -> None:
    marker = f"camopd-survivor-{uuid.uuid4().hex}"
    child = f"import os, time\\nif os.fork() == 0:\\n    os.setsid(); time.sleep(60)\\ntime.sleep(60)  # {marker}"
    prog = (
        UNHOOK + "import os, subprocess, sys\n"
        f"a = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)  # {marker}'])\n"
        f"b = subprocess.Popen([sys.executable, '-c', '{child}'], start_new_session=True)\n"
        f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'])\n"
        "import time\ntime.sleep(0.5)\nprint(a.pid, b.pid, c.pid, flush=True)\n"
        + ("while True:\n    pass\n" if ending == "timeout" else "")
    )
    lim = SandboxLimits(wall_time_s=2.0)
    res = run_python(prog, limits=lim)
    assert len(res.stdout.split()) == 3, res  # the children were started
    assert res.timed_out == (ending == "timeout")
    assert _survivors(marker) == []


def test_interrupted_run_leaves_nothing() -> None:
    """An exception in the parent mid-run (here a timer signal, like Ctrl-C) still kills the whole sandbox."""
    marker = f"camopd-interrupted-{uuid.uuid4().hex}"
    prog = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', "
        f"'import os, time; os.setsid(); time.sleep(60)  # {marker}'])\ntime.sleep(60)\n"
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_python(prog, limits=SandboxLimits(wall_time_s=30.0))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert _survivors(marker) == []


def test_fork_bomb_is_bounded() -> None:
    marker = f"camopd-bomb-{uuid.uuid4().hex}"
    lim = SandboxLimits(max_processes=16)
    prog = (
        "import os, time\nn = 0\nfor _ in range(400):\n    try:\n        if os.fork() == 0:\n"
        f"            os.execv('/bin/sleep', ['sleep', '30', '{marker}'])\n        n += 1\n"
        "    except OSError:\n        break\nprint(n)\n"
    )
    res = run_python(prog, limits=lim)
    assert res.ok and 0 < int(res.stdout) < lim.max_processes, res
    assert _survivors(marker) == []


def test_memory_and_disk_bombs_are_bounded() -> None:
    lim = SandboxLimits(memory_mb=256, tmpfs_mb=8)
    res = run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", limits=lim)
    assert not res.ok and "MemoryError" in res.stderr and "allocated" not in res.stdout
    fill = (
        "import os\nfor d in ('/tmp', '/work'):\n    n = 0\n    try:\n        while n < 1000:\n"
        "            open(f'{d}/f{n}', 'wb').write(b'x' * 2 ** 20); n += 1\n    except OSError:\n        pass\n"
        "    print(n)\n"
    )
    res = run_python(fill, limits=lim)
    assert res.ok and all(int(n) <= lim.tmpfs_mb for n in res.stdout.split()), res


def test_output_flood_is_bounded() -> None:
    lim = SandboxLimits(wall_time_s=5.0, max_output_bytes=64 * 1024)
    t0 = time.monotonic()
    res = run_python("while True:\n    print('x' * 1000)\n", limits=lim)
    assert not res.ok and len(res.stdout) <= 64 * 1024 and time.monotonic() - t0 < 4


def test_infinite_loop_and_sleep_are_bounded_by_wall_time() -> None:
    for prog in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):
        t0 = time.monotonic()
        res = run_python(prog, limits=SandboxLimits(wall_time_s=1.0))
        assert res.timed_out and not res.ok and res.returncode is None and time.monotonic() - t0 < 4


def test_correct_solution_still_scores() -> None:
    prog = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```"
    assert code(prog, {"tests": [{"stdin": "2 40\n", "stdout": "42"}]}) == 1.0
    assert code("def f(x):\n    return sorted(x)\n", "assert f([3, 1, 2]) == [1, 2, 3]") == 1.0
    assert get_verifier("code") is code


def test_missing_bubblewrap_is_refused_with_a_clear_error() -> None:
    lim = SandboxLimits(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        run_python("print(1)", limits=lim)
    with pytest.raises(SandboxUnavailable, match="bubblewrap not found"):
        code("print(1)", {"tests": [{"stdin": "", "stdout": "1"}]}, limits=lim)  # refused, not scored 0.0
    with pytest.raises(SandboxUnavailable):
        ensure_available(lim)
    assert issubclass(SandboxUnavailable, CamopdError)  # the CLI prints it as one line, exit status 2


def _world_readable_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="camopd_sbx_"))
    d.chmod(0o755)
    return d


def test_bwrap_without_namespaces_is_refused() -> None:
    d = _world_readable_dir()
    try:
        fake = d / "bwrap"
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace.*user namespaces"):
            run_python("print(1)", limits=SandboxLimits(bwrap=str(fake)))
    finally:
        shutil.rmtree(d)


def test_interpreter_outside_usr_gets_only_its_prefix() -> None:
    """An interpreter installed outside /usr runs with its own prefix bound read-only, and nothing more."""
    prefix = _world_readable_dir()
    try:
        (prefix / "bin").mkdir(mode=0o755)
        shutil.copy2(os.path.realpath("/usr/bin/python3"), prefix / "bin" / "python3")  # stdlib from /usr
        prog = (
            f"import os\nprint([os.path.exists(p) for p in ({str(prefix / 'bin' / 'python3')!r}, "
            f"'/root/.bashrc', {str(Path(megatron_camopd.__file__))!r})])\nopen({str(prefix)!r} + '/x', 'w')\n"
        )
        res = run_python(prog, limits=SandboxLimits(python=str(prefix / "bin" / "python3")))
        assert res.stdout == "[True, False, False]\n" and "Read-only file system" in res.stderr, res
    finally:
        shutil.rmtree(prefix)


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox user is the caller's uid when not run as root")
def test_interpreter_unreachable_by_the_sandbox_user_is_refused() -> None:
    hidden = Path(tempfile.mkdtemp(prefix="camopd_sbx_"))  # 0700 root: uid 65534 cannot enter it
    try:
        (hidden / "bin").mkdir()
        shutil.copy2(os.path.realpath("/usr/bin/python3"), hidden / "bin" / "python3")
        with pytest.raises(SandboxUnavailable, match="readable by uid 65534.*SandboxLimits.python"):
            run_python("print(1)", limits=SandboxLimits(python=str(hidden / "bin" / "python3")))
    finally:
        shutil.rmtree(hidden)


def test_runs_from_a_process_holding_descriptors_past_1024() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1050)]  # a long run's sockets, pipes, files
    try:
        assert max(held) >= 1024
        res = run_python("print(6 * 7)")
        assert res.ok and res.stdout.strip() == "42"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
