"""The launch protocol (launch/protocol.py) over real HTTP and real files, through the command line the sbatch
scripts call and through the bash functions of templates/lib.sh that wrap it."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_camopd.config.serving import SGLANG_VERSION
from megatron_camopd.launch.protocol import LIB_SH, healthy_servers, register_address


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _free_dead_port() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "megatron_camopd.launch.protocol", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_register_and_count_healthy(tmp_path: Path, server: str) -> None:
    addr = str(tmp_path / "general.addr")
    assert healthy_servers(addr, 2.0) == []  # not there yet
    assert _cli("register", addr, server).returncode == 0
    register_address(addr, _free_dead_port())  # a dead server is listed but not healthy
    assert len(Path(addr).read_text().splitlines()) == 2
    assert healthy_servers(addr, 2.0) == [f"http://{server}"]
    assert _cli("healthy", addr, "--timeout", "2").stdout.strip() == "1"
    assert _cli("health", f"http://{server}/health").returncode == 0
    assert _cli("health", f"http://{server}/nope").returncode == 1


def test_malformed_discovery_line_counts_nothing_and_says_why(tmp_path: Path) -> None:
    addr = tmp_path / "g.addr"
    addr.write_text("not-an-address\n")
    proc = _cli("healthy", str(addr))
    assert proc.stdout.strip() == "0" and f"{addr}:1: expected host:port" in proc.stderr


def test_lib_sh_functions_use_the_protocol(tmp_path: Path, server: str) -> None:
    """The bash side: sourcing the package's lib.sh gives register_address/healthy_count backed by this module."""
    assert Path(_cli("lib-path").stdout.strip()) == LIB_SH
    addr = tmp_path / "d.addr"
    script = (
        f'set -euo pipefail; PYTHON={sys.executable}; HEALTH_CHECK_TIMEOUT_S=2; source "{LIB_SH}"; '
        f"register_address {addr} {server}; register_address {addr} {_free_dead_port()}; "
        f"healthy_count {addr}; http_ok http://{server}/health && echo up"
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "up"]


@pytest.mark.parametrize("which", ["sglang env", "no sglang", "other release"])
def test_the_server_job_checks_the_sglang_release_before_starting_servers(which: str, sglang_python: Path) -> None:
    """`check_sglang_version` (the server jobs run it first): the tested release is logged; a Python without SGLang
    fails the job naming launcher.sglang_python; another release is logged with a warning."""
    python, tested = {
        "sglang env": (sglang_python, SGLANG_VERSION),
        "no sglang": (Path(sys.executable), SGLANG_VERSION),  # the trainer's venv: SGLang lives in its own env
        "other release": (sglang_python, "0.0.1"),
    }[which]
    script = (
        f'set -euo pipefail; SERVER_BACKEND=sglang; SGLANG_PYTHON="{python}"; SGLANG_TESTED={tested}; '
        f'source "{LIB_SH}"; check_sglang_version'
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    if which == "no sglang":
        assert proc.returncode == 1 and "has no sglang package (set launcher.sglang_python)" in proc.stdout, proc
    elif which == "sglang env":
        assert proc.returncode == 0 and f"SGLang {SGLANG_VERSION} (the tested release)" in proc.stdout, proc
    else:
        assert proc.returncode == 0 and f"WARNING: SGLang {SGLANG_VERSION} from" in proc.stdout, proc
