"""Real vLLM servers for the tests: `python -m vllm.entrypoints.openai.api_server` from the vLLM environment the
project builds (`megatron_camopd.launch.vllm_env`, once per machine), with the CPU flags the launchers use
(`launch.servers.VLLM_CPU_ARGS`), on a free port of 127.0.0.1, serving a tiny HF model.

vllm-cpu 0.32 runs unmodified here: `--gpu-memory-utilization` is a fraction of the machine's memory, and an
explicit `--kv-cache-memory-bytes` keeps each test server's KV pool small (and skips its warm-up pass). Its
attention needs head_dim 64 (16 fails), so the tests serve models of that shape. A server runs in its own session
(process group: the API server, its engine core and worker): `stop()` ends the whole group by its pid, as
`tests/sglang_servers.py` does. Starting one takes ~40-100 s on 2 shared cores; `start_vllm_servers` starts
several at once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megatron_camopd.launch.servers import VLLM_CPU_ARGS
from tests.sglang_servers import SglangServer, free_port, wait_answering

START_TIMEOUT_S = 420.0
KV_BYTES = 64 * 2**20  # each test server's KV pool (its tokens far exceed what a test sends)

VllmServer = SglangServer  # the same process-group handle: url, log, model, stop(), kill(), alive()


def launch_vllm(
    python: str | os.PathLike,
    model: str | os.PathLike,
    log: Path,
    *,
    max_model_len: int = 256,
    extra: tuple[str, ...] = (),
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> VllmServer:
    """Start one server (not waiting for it): the launchers' vLLM command line plus the CPU flags (`env`: more
    variables, e.g. `launch.servers.VLLM_ROLLOUT_ENV` for a rollout server)."""
    port = port or free_port()
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len),
        "--gpu-memory-utilization",
        "0.1",
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
        *VLLM_CPU_ARGS,
        *extra,
    ]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONUNBUFFERED": "1"}
    full.pop("PYTHONPATH", None)  # the server imports its own environment only
    full.update(env or {})
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return VllmServer(proc, f"http://127.0.0.1:{port}", log, str(model))


def wait_healthy(servers: list[VllmServer], timeout_s: float = START_TIMEOUT_S) -> None:
    wait_answering(servers, "/health", "vLLM", timeout_s)


def start_vllm_servers(
    python: str | os.PathLike, models: list[str | os.PathLike], workdir: Path, **kwargs
) -> list[VllmServer]:
    """Start one server per model at once and wait until every one answers `/health`."""
    servers = [launch_vllm(python, m, workdir / f"vllm{i}.log", **kwargs) for i, m in enumerate(models)]
    wait_healthy(servers)
    return servers
