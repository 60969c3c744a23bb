"""`camopd serve`: the CPU stand-in of an SGLang server (aiohttp), for a teacher (scoring) or the student (sampling).

The same clients (`HttpTeacher`, `SglangSampler`) talk to this server in tests/CPU runs and to real SGLang on
GPUs, so requests and responses have SGLang's shapes. `POST /generate` scores (`max_new_tokens: 0`) and samples
(`serve/generation.py`, batched server-side up to `max_batch` items or `max_wait_ms`, run on `--workers` threads,
round-robin over requests); weights are updated in place and generation paused/continued through SGLang's
endpoints (`serve/weights.py`).
Also `GET /health` and `GET /health_generate` (both wait while the server is paused and answer 503 after
`SGLANG_HEALTH_CHECK_TIMEOUT` seconds, as SGLang's generating health check does), `GET /ready`, `GET /model_info`
(and its deprecated alias `/get_model_info`). `serve_main` serves a HuggingFace dir or a
camopd checkpoint with megatron-core (`served_model.ServedModel`: scoring, sampling, weight updates), or with
transformers for scoring only (`--backend hf`: `hf_scorer.HFScorer`). It binds 127.0.0.1 unless told otherwise.

Hostile requests are bounded: bodies over `--max-body-bytes` get 413, a body whose Content-Type is not JSON 415,
a body that is not strict JSON or nests deeper than 32 levels 400 (`guard_middleware`, before any handler); a
prompt (+ max_new_tokens) past the context length 400 naming the field and the limit; a `/generate` unanswered
after `--request-timeout-s` 504 (its remaining work dropped). A bad `--host`/`--port` (out of range, in use,
unresolvable) is an error (exit 2) before the model loads.
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

from ..errors import CamopdError
from ..teachers.base import Scorer
from .generate_api import ApiError, load_json, parse_generate
from .generation import BODY_KEY, STATE_KEY, ExclusiveExecutor, ModelLock, ServeState, WorkBatcher, generate_handler
from .weights import add_weight_routes


@dataclass
class ServerStats:
    """Counters a test or an operator can read: requests, sequences, batches, peak concurrent requests and busy
    workers, timed-out requests and the items dropped because their request was given up."""

    requests: int = 0
    sequences: int = 0
    batches: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_busy_workers: int = 0
    timeouts: int = 0
    abandoned: int = 0
    errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))


SCORER_KEY = web.AppKey("scorer", Scorer)
STATS_KEY = web.AppKey("stats", ServerStats)
BATCHER_KEY = web.AppKey("batcher", WorkBatcher)


async def _generate(request: web.Request) -> web.Response:
    return await generate_handler(request, request.app[STATS_KEY], request.app[BATCHER_KEY])


async def _unpaused(state) -> bool:
    """SGLang's generating health check waits while the server is paused: True once it runs again, False when
    `health_check_timeout_s` passed first (SGLang then answers 503 and marks itself unhealthy: `/ready` is 503
    until a health check succeeds)."""
    try:
        await asyncio.wait_for(state.running.wait(), state.health_check_timeout_s)
    except TimeoutError:
        state.healthy = False
        return False
    state.healthy = True
    return True


async def _health(request: web.Request) -> web.Response:
    if not await _unpaused(request.app[STATE_KEY]):
        return web.Response(status=503, text="paused: the generating health check got no answer")
    return web.Response(status=200)


async def _ready(request: web.Request) -> web.Response:
    """SGLang's `/ready`: 200 when the server takes new requests, 503 while paused or after a failed health check."""
    state = request.app[STATE_KEY]
    return web.Response(status=200 if state.running.is_set() and state.healthy else 503)


async def _health_generate(request: web.Request) -> web.Response:
    """A one-token generation (SGLang's check); a scoring-only server scores two tokens instead."""
    state = request.app[STATE_KEY]
    if not await _unpaused(state):
        return web.Response(status=503, text="paused: the generating health check got no answer")
    body = {"input_ids": [0, 0], "sampling_params": {"max_new_tokens": int(state.can_generate), "temperature": 0}}
    try:
        items, _ = parse_generate(body, vocab=state.model.vocab_size(), context_len=state.context_len)
        await asyncio.wait_for(request.app[BATCHER_KEY].submit(items[0]), state.request_timeout_s)
    except TimeoutError:
        return web.Response(status=503, text=f"model did not answer within {state.request_timeout_s:g} s")
    except Exception as exc:  # noqa: BLE001
        return web.Response(status=503, text=f"model failed: {exc}")
    return web.Response(status=200)


async def _model_info(request: web.Request) -> web.Response:
    scorer = request.app[SCORER_KEY]
    state = request.app[STATE_KEY]
    info = {
        "is_generation": True,
        "vocab_size": scorer.vocab_size(),
        "weight_version": state.weight_version,
        "context_length": state.context_len,
        **scorer.model_info(),
    }
    info.setdefault("model_path", None)
    info.setdefault("tokenizer_path", None)
    info.setdefault("tokenizer_fingerprint", None)
    return web.json_response(info)


JSON_TYPES = ("application/json", "text/json")


def _refuse(status: int, message: str) -> web.Response:
    """An error answer both kinds of clients read: SGLang's /generate shape and its control endpoints' shape."""
    return web.json_response(
        {"error": {"message": message, "code": status}, "success": False, "message": message}, status=status
    )


def guard_middleware(max_body_bytes: int, read_timeout_s: float | None):
    """Reads and checks every request body before its handler: 413 over `max_body_bytes`, 415 for a non-JSON
    Content-Type, 400 for a body that is not strict JSON or nests too deep, 408 for one not sent within
    `read_timeout_s`. The decoded body is `request[BODY_KEY]` (absent for an empty body)."""

    @web.middleware
    async def guard(request: web.Request, handler):
        response = await _check_body(request)
        if response is not None:
            request.app[STATS_KEY].errors[response.status] += 1
            return response
        return await handler(request)

    async def _check_body(request: web.Request) -> web.Response | None:
        if request.method in ("POST", "PUT", "PATCH") and request.body_exists:
            if request.content_length is not None and request.content_length > max_body_bytes:
                return _refuse(
                    413,
                    f"request body of {request.content_length} bytes is larger than "
                    f"{max_body_bytes} bytes (the server's --max-body-bytes)",
                )
            ctype = request.headers.get("Content-Type")
            if (
                ctype is not None
                and request.content_type not in JSON_TYPES
                and not request.content_type.endswith("+json")
            ):
                return _refuse(415, f"Content-Type {request.content_type!r} is not JSON: send application/json")
            try:
                raw = await asyncio.wait_for(request.read(), read_timeout_s)
            except web.HTTPRequestEntityTooLarge:
                return _refuse(413, f"request body larger than {max_body_bytes} bytes (the server's --max-body-bytes)")
            except TimeoutError:
                return _refuse(408, f"request body not received within {read_timeout_s:g} s")
            if raw.strip():
                try:
                    request[BODY_KEY] = load_json(raw)
                except ApiError as exc:
                    return _refuse(400, str(exc))
        return None

    return guard


def make_app(
    scorer: Scorer,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    context_length: int | None = None,
    max_body_bytes: int = 64 << 20,
    workers: int = 2,
    request_timeout_s: float | None = 900.0,
) -> web.Application:
    """The aiohttp application serving `scorer` (batching up to `max_batch` items or `max_wait_ms`, on `workers`
    threads). A model with `generate` (a `ServedModel`) also samples and takes weight updates. `context_length`
    bounds prompt + max_new_tokens (default: the model's); bodies are at most `max_body_bytes`; a /generate
    request is answered 504 after `request_timeout_s` (None: never)."""
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[guard_middleware(max_body_bytes, request_timeout_s)]
    )
    stats = ServerStats()
    app[SCORER_KEY] = scorer
    app[STATS_KEY] = stats
    ctx = context_length or getattr(scorer, "context_length", None) or _scorer_context(scorer)
    lock = ModelLock()
    state = ServeState(
        model=scorer,
        pool=ExclusiveExecutor(lock),
        lock=lock,
        context_len=int(ctx),
        workers=ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model"),
        request_timeout_s=request_timeout_s,
    )
    state.running.set()
    app[STATE_KEY] = state

    async def _lifecycle(app: web.Application):
        batcher = WorkBatcher(state, stats, max_batch, max_wait_ms / 1000.0, workers)
        app[BATCHER_KEY] = batcher
        batcher.task = asyncio.create_task(batcher.run())
        yield
        batcher.task.cancel()
        for task in list(batcher.tasks):
            task.cancel()
        state.pool.shutdown(wait=False, cancel_futures=True)
        if state.workers is not None:
            state.workers.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/generate", _generate)
    app.router.add_put("/generate", _generate)
    app.router.add_get("/health", _health)
    app.router.add_get("/health_generate", _health_generate)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/model_info", _model_info)
    app.router.add_get("/get_model_info", _model_info)  # SGLang's deprecated alias
    add_weight_routes(app, BATCHER_KEY)
    return app


UNKNOWN_CONTEXT = 32768  # the context length of a scorer that does not say (a wrapper in tests)


def _scorer_context(scorer: Scorer) -> int:
    """A scoring-only model's context length: its position embeddings, else `UNKNOWN_CONTEXT`."""
    config = getattr(getattr(scorer, "model", None), "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return UNKNOWN_CONTEXT


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
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp: set once start() returns
    return runner, int(port)


async def _serve_until_signal(app: web.Application, host: str, port: int, ready_file: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, real_port = await start_site(app, host, port)
    except OSError as exc:  # the address was taken while the model loaded
        raise CamopdError(f"--host {host} --port {port}: cannot listen there: {exc.strerror or exc}") from None
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


def start_local_replicas(
    checkpoint: str | os.PathLike,
    workdir: str | os.PathLike,
    n: int,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 300.0,
    extra_args: tuple[str, ...] = (),
) -> list[LocalReplica]:
    """Start `n` `camopd serve` replicas of `checkpoint` at once (port 0) and wait for each one's ready file."""
    pending = []
    for i in range(n):
        ready, log = os.path.join(workdir, f"replica{i}.ready"), os.path.join(workdir, f"replica{i}.log")
        if os.path.exists(ready):
            os.remove(ready)
        cmd = [
            sys.executable,
            "-m",
            "megatron_camopd.cli",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--port",
            "0",
            "--ready-file",
            ready,
            *extra_args,
        ]
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


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {v}")
        return v

    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def check_listen(host: str, port: int) -> None:
    """CamopdError unless this process can listen on host:port (checked before the model loads)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise CamopdError(f"--host {host!r}: cannot resolve it: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
        try:
            sock.bind(addr)
        except OSError as exc:
            raise CamopdError(f"--host {host} --port {port}: cannot listen there: {exc.strerror or exc}") from None


def model_positions(path: str) -> int | None:
    """The positions the model at `path` (a HF dir or a camopd checkpoint) was built for, from its config.json."""
    import json
    from pathlib import Path

    from .megatron_scorer import checkpoint_kind

    meta = Path(path)
    if checkpoint_kind(path) != "hf":
        from ..backend.checkpoint import find_model_meta

        meta = Path(find_model_meta(path))
    try:
        cfg = json.loads((meta / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CamopdError(f"{meta / 'config.json'}: cannot read it: {exc}") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    n = next(
        (
            cfg[k]
            for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
            if isinstance(cfg.get(k), int) and cfg[k] > 0
        ),
        None,
    )
    return n


def serve_main(argv: list[str] | None = None) -> int:
    """`camopd serve --checkpoint DIR [--tokenizer DIR] [--host H] [--port P] [--ready-file F] [--backend B]
    [--workers N] [--request-timeout-s S] [--max-body-bytes B] ...` (`camopd serve-teacher` is the same command)."""
    parser = argparse.ArgumentParser(prog="camopd serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a HuggingFace dir (config.json + weights) or a camopd checkpoint (root or iter_* dir)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=_int_in(0, 65535), default=0, help="0 = any free port (see --ready-file)")
    parser.add_argument("--ready-file", default=None, help="write host:port here (atomically) once listening")
    parser.add_argument(
        "--backend",
        choices=("auto", "megatron", "hf"),
        default="auto",
        help="megatron: megatron-core, scores and samples; hf: transformers, scores only; "
        "auto: megatron when it builds the architecture",
    )
    parser.add_argument(
        "--context-length",
        type=_int_in(2, 1 << 24),
        default=None,
        help="prompt + max_new_tokens must stay below this; at most the model's positions "
        "(default: max_position_embeddings)",
    )
    parser.add_argument("--max-batch", type=_int_in(1, 4096), default=16, help="items per model call")
    parser.add_argument("--max-wait-ms", type=_seconds, default=5.0, help="how long a batch collects items")
    parser.add_argument(
        "--workers",
        type=_int_in(1, 64),
        default=2,
        help="model calls running at once (threads); one long request holds only one of them",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=_seconds,
        default=900.0,
        help="a /generate request unanswered after this long gets 504 and its remaining work is dropped (0: no limit)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_int_in(1024, 1 << 34),
        default=64 << 20,
        help="largest request body accepted (413 above)",
    )
    args = parser.parse_args(argv)
    check_listen(args.host, args.port)
    positions = model_positions(args.checkpoint)
    if args.context_length and positions and args.context_length > positions:
        raise CamopdError(
            f"--context-length {args.context_length} is more than the model's "
            f"{positions} positions (max_position_embeddings in its config.json)"
        )
    model = load_model(args.checkpoint, args.tokenizer, args.backend, args.context_length)
    run_server(
        model,
        args.host,
        args.port,
        args.ready_file,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        context_length=args.context_length,
        max_body_bytes=args.max_body_bytes,
        workers=args.workers,
        request_timeout_s=args.request_timeout_s or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
