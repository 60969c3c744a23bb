"""`camopd serve`: the CPU stand-in of an SGLang server (aiohttp), for a teacher (scoring) or the student (sampling).

The same clients (`HttpTeacher`, `SglangSampler`) talk to this server in tests/CPU runs and to real SGLang on
GPUs, so requests and responses have SGLang's shapes. `POST /generate` scores (`max_new_tokens: 0`) and samples
(`serve/generation.py`, batched server-side up to `max_batch` items or `max_wait_ms`, run in one worker thread);
weights are updated in place and generation paused/continued through SGLang's endpoints (`serve/weights.py`).
Also `GET /health`, `GET /health_generate`, `GET /get_model_info`. `serve_main` serves a HuggingFace dir or a
camopd checkpoint with megatron-core (`served_model.ServedModel`: scoring, sampling, weight updates), or with
transformers for scoring only (`--backend hf`: `hf_scorer.HFScorer`). It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..teachers.base import Scorer
from .generate_api import parse_generate
from .generation import STATE_KEY, ServeState, WorkBatcher, generate_handler
from .weights import add_weight_routes


@dataclass
class ServerStats:
    """Counters a test or an operator can read: requests, sequences, batches, and peak concurrent requests."""

    requests: int = 0
    sequences: int = 0
    batches: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))


SCORER_KEY = web.AppKey("scorer", Scorer)
STATS_KEY = web.AppKey("stats", ServerStats)
BATCHER_KEY = web.AppKey("batcher", WorkBatcher)


async def _generate(request: web.Request) -> web.Response:
    return await generate_handler(request, request.app[STATS_KEY], request.app[BATCHER_KEY])


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _health_generate(request: web.Request) -> web.Response:
    """A one-token generation (SGLang's check); a scoring-only server scores two tokens instead."""
    state = request.app[STATE_KEY]
    body = {"input_ids": [0, 0], "sampling_params": {"max_new_tokens": int(state.can_generate), "temperature": 0}}
    try:
        items, _ = parse_generate(body, vocab=state.model.vocab_size(), context_len=state.context_len)
        await request.app[BATCHER_KEY].submit(items[0])
    except Exception as exc:  # noqa: BLE001
        return web.Response(status=503, text=f"model failed: {exc}")
    return web.Response(status=200)


async def _model_info(request: web.Request) -> web.Response:
    scorer = request.app[SCORER_KEY]
    state = request.app[STATE_KEY]
    info = {"is_generation": True, "vocab_size": scorer.vocab_size(), "weight_version": state.weight_version,
            "context_length": state.context_len, **scorer.model_info()}
    info.setdefault("model_path", None)
    info.setdefault("tokenizer_path", None)
    info.setdefault("tokenizer_fingerprint", None)
    return web.json_response(info)


def make_app(scorer: Scorer, *, max_batch: int = 16, max_wait_ms: float = 5.0, context_length: int | None = None,
             max_body_mb: int = 64) -> web.Application:
    """The aiohttp application serving `scorer` (batching up to `max_batch` items or `max_wait_ms`). A model with
    `generate` (a `ServedModel`) also samples and takes weight updates. `context_length` bounds prompt +
    max_new_tokens (default: the model's, else its position embeddings); bodies are at most `max_body_mb`."""
    app = web.Application(client_max_size=max_body_mb * 1024 * 1024)
    stats = ServerStats()
    app[SCORER_KEY] = scorer
    app[STATS_KEY] = stats
    ctx = context_length or getattr(scorer, "context_length", None) or _scorer_context(scorer)
    state = ServeState(model=scorer, pool=ThreadPoolExecutor(max_workers=1, thread_name_prefix="model"),
                       context_len=int(ctx))
    state.running.set()
    app[STATE_KEY] = state

    async def _lifecycle(app: web.Application):
        batcher = WorkBatcher(state, stats, max_batch, max_wait_ms / 1000.0)
        app[BATCHER_KEY] = batcher
        batcher.task = asyncio.create_task(batcher.run())
        yield
        batcher.task.cancel()
        state.pool.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/generate", _generate)
    app.router.add_put("/generate", _generate)
    app.router.add_get("/health", _health)
    app.router.add_get("/health_generate", _health_generate)
    app.router.add_get("/get_model_info", _model_info)
    add_weight_routes(app, BATCHER_KEY)
    return app


def _scorer_context(scorer: Scorer) -> int:
    """A scoring-only model's context length: its position embeddings when known."""
    model = getattr(scorer, "model", None)
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else 1 << 20


def write_ready_file(path: str, host: str, port: int) -> None:
    """Atomically write `host:port` (a wildcard bind address is replaced by this machine's hostname)."""
    shown = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{shown}:{port}\n")
    os.replace(tmp, path)


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving `app`; return the runner and the real port (so `port=0` works)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, int(port)


async def _serve_until_signal(app: web.Application, host: str, port: int, ready_file: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, real_port = await start_site(app, host, port)
    print(f"camopd server listening on {host}:{real_port}", flush=True)
    if ready_file:
        write_ready_file(ready_file, host, real_port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        print("camopd server stopped", flush=True)


def run_server(
    scorer: Scorer, host: str = "127.0.0.1", port: int = 0, ready_file: str | None = None, **app_kwargs: Any
) -> None:
    """Serve `scorer` until SIGTERM/SIGINT; write `host:port` to `ready_file` once listening."""
    asyncio.run(_serve_until_signal(make_app(scorer, **app_kwargs), host, port, ready_file))


class ServerThread:
    """A server running in a background thread of this process (tests, demos): `with ServerThread(s) as srv:`."""

    def __init__(self, scorer: Scorer, host: str = "127.0.0.1", port: int = 0, **app_kwargs: Any):
        self.app = make_app(scorer, **app_kwargs)
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="camopd-server")
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_site(self.app, host, port), self._loop)
        self._runner, self.port = fut.result(timeout=30)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> ServerStats:
        return self.app[STATS_KEY]

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalReplica:
    """A `camopd serve` subprocess on this machine (tests, benchmarks): its process, URL and log file."""

    proc: subprocess.Popen
    url: str
    log: str

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (graceful), SIGKILL after `timeout_s`. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_local_replicas(checkpoint: str | os.PathLike, workdir: str | os.PathLike, n: int, *,
                         env: dict[str, str] | None = None, timeout_s: float = 300.0,
                         extra_args: tuple[str, ...] = ()) -> list[LocalReplica]:
    """Start `n` `camopd serve` replicas of `checkpoint` at once (port 0) and wait for each one's ready file."""
    pending = []
    for i in range(n):
        ready, log = os.path.join(workdir, f"replica{i}.ready"), os.path.join(workdir, f"replica{i}.log")
        if os.path.exists(ready):
            os.remove(ready)
        cmd = [sys.executable, "-m", "megatron_camopd.cli", "serve", "--checkpoint", str(checkpoint),
               "--port", "0", "--ready-file", ready, *extra_args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        pending.append((proc, ready, log))
    replicas, deadline = [], time.monotonic() + timeout_s
    for proc, ready, log in pending:
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                for p, _, _ in pending:
                    p.kill()
                with open(log) as f:
                    raise RuntimeError(f"replica of {checkpoint} did not start:\n{f.read()[-3000:]}")
            time.sleep(0.2)
        with open(ready) as f:
            replicas.append(LocalReplica(proc, "http://" + f.read().strip(), log))
    return replicas


def load_model(path: str, tokenizer: str | None, backend: str, context_length: int | None):
    """The model `camopd serve` serves: megatron-core (scores, samples, takes weight updates) or transformers
    (scores only). `auto` is megatron-core when it builds the architecture (Qwen3, Llama), else transformers."""
    from ..backend.model import ModelArch
    from ..errors import CamopdError
    from .megatron_scorer import checkpoint_kind

    if backend == "auto":
        try:
            if checkpoint_kind(path) == "hf":
                ModelArch.from_hf_dir(path)
            backend = "megatron"
        except CamopdError as exc:
            if checkpoint_kind(path) != "hf":
                raise
            print(f"camopd serve: {exc}; serving with transformers (scoring only)", flush=True)
            backend = "hf"
    if backend == "hf":
        from .hf_scorer import load_scorer

        if checkpoint_kind(path) != "hf":
            raise CamopdError(f"--backend hf: {path} is a camopd checkpoint; serve it with --backend megatron")
        return load_scorer(path, tokenizer)
    from .served_model import load_served_model

    return load_served_model(path, tokenizer, context_length=context_length)


def serve_main(argv: list[str] | None = None) -> int:
    """`camopd serve --checkpoint DIR [--tokenizer DIR] [--host H] [--port P] [--ready-file F] [--backend B]`
    (`camopd serve-teacher` is the same command)."""
    parser = argparse.ArgumentParser(prog="camopd serve", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a HuggingFace dir (config.json + weights) or a camopd checkpoint (root or iter_* dir)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (see --ready-file)")
    parser.add_argument("--ready-file", default=None, help="write host:port here (atomically) once listening")
    parser.add_argument("--backend", choices=("auto", "megatron", "hf"), default="auto",
                        help="megatron: megatron-core, scores and samples; hf: transformers, scores only; "
                             "auto: megatron when it builds the architecture")
    parser.add_argument("--context-length", type=int, default=None,
                        help="prompt + max_new_tokens must stay below this (default: max_position_embeddings)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-body-mb", type=int, default=64, help="largest request body accepted")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint, args.tokenizer, args.backend, args.context_length)
    run_server(model, args.host, args.port, args.ready_file, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
               context_length=args.context_length, max_body_mb=args.max_body_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
