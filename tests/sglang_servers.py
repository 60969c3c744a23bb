"""Real SGLang servers for the tests: `python -m sglang.launch_server` from the SGLang environment the project
builds (`megatron_camopd.launch.sglang_env`, once per machine), with the CPU flags the launchers use
(`launch.servers.SGLANG_CPU_ARGS`), on a free port of 127.0.0.1, serving a tiny HF model.

SGLang's CPU path imports a few kernels of `sgl_kernel`, whose registry wheels are CUDA-only; `tests/sglang_cpu/`
provides them (test-only) and is put on the server's PYTHONPATH. A server runs in its own session (process
group): `stop()` ends the whole group (the scheduler and detokenizer processes included) by its pid, SIGTERM then
SIGKILL. Starting one takes ~20-40 s on 2 cores; `start_sglang_servers` starts several at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from megatron_camopd.launch.servers import SGLANG_CPU_ARGS, SGLANG_CPU_ENV

KERNEL_STANDIN = Path(__file__).resolve().parent / "sglang_cpu"
START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SglangServer:
    """One real SGLang server process group: its URL, log and model."""

    proc: subprocess.Popen
    url: str
    log: Path
    model: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`. Idempotent."""
        if self.proc.poll() is not None:
            _reap_group(self.proc.pid)
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _reap_group(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a server dying mid-run)."""
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap_group(pgid: int) -> None:
    """Children of a server that outlived it (the scheduler): killed by their process group, never by name."""
    _signal_group(pgid, signal.SIGKILL)


def answers(url: str, route: str) -> bool:
    """Whether the server at `url` answers GET `route` with 200."""
    try:
        with urllib.request.urlopen(f"{url}{route}", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def launch_sglang(
    python: str | os.PathLike,
    model: str | os.PathLike,
    log: Path,
    *,
    context_length: int | None = None,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> SglangServer:
    """Start one server (not waiting for it): the launchers' SGLang command line plus the CPU flags."""
    port = port or free_port()
    cmd = [
        str(python),
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--mem-fraction-static",
        "0.3",
        *SGLANG_CPU_ARGS,
        *(("--context-length", str(context_length)) if context_length else ()),
        *extra,
    ]
    server_env = {
        **os.environ,
        **SGLANG_CPU_ENV,
        "SGLANG_RETURN_ORIGINAL_LOGPROB": "1",
        "PYTHONPATH": str(KERNEL_STANDIN),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return SglangServer(proc, f"http://127.0.0.1:{port}", log, str(model))


def wait_answering(servers: list[SglangServer], route: str, engine: str, timeout_s: float) -> None:
    """Wait until every server answers `route`; a server that dies or a timeout stops them all and raises with the
    log's tail."""
    deadline = time.monotonic() + timeout_s
    for s in servers:
        while not answers(s.url, route):
            if not s.alive() or time.monotonic() > deadline:
                for other in servers:
                    other.stop()
                raise RuntimeError(f"{engine} server of {s.model} did not start:\n{s.log.read_text()[-4000:]}")
            time.sleep(0.5)


def wait_ready(servers: list[SglangServer], timeout_s: float = START_TIMEOUT_S) -> None:
    wait_answering(servers, "/model_info", "SGLang", timeout_s)


def start_sglang_servers(
    python: str | os.PathLike, models: list[str | os.PathLike], workdir: Path, **kwargs
) -> list[SglangServer]:
    """Start one server per model at once and wait until every one answers `/model_info`."""
    servers = [launch_sglang(python, m, workdir / f"sglang{i}.log", **kwargs) for i, m in enumerate(models)]
    wait_ready(servers)
    return servers
