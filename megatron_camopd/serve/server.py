"""CPU teacher server: SGLang's `/generate` scoring subset over any `Scorer` (aiohttp).

The same client (`HttpTeacher`) talks to this server in tests/CPU runs and to real SGLang on GPUs, so requests and
responses have SGLang's exact shapes. It is scoring-only: `max_new_tokens` must be 0. Requests are batched
server-side (up to `max_batch` sequences or `max_wait_ms`), scored in one worker thread, answered in order.
Endpoints: `POST /generate`, `GET /health`, `GET /health_generate`, `GET /get_model_info`.
`serve_main` serves a HuggingFace dir (`hf_scorer.HFScorer`) or a camopd checkpoint (`megatron_scorer.MegatronScorer`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..teachers.base import Scorer, TeacherScores
from ..teachers.protocol import build_response


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
BATCHER_KEY = web.AppKey("batcher", object)


class _Batcher:
    """Collects sequences from concurrent requests and scores them together in one worker thread."""

    def __init__(self, scorer: Scorer, stats: ServerStats, max_batch: int, max_wait_s: float):
        self.scorer, self.stats = scorer, stats
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: asyncio.Queue[tuple[list[int], int | None, asyncio.Future]] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self.task: asyncio.Task | None = None

    async def submit(self, ids: list[int], top_k: int | None) -> TeacherScores:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((ids, top_k, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(items) < self.max_batch:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            groups: dict[int | None, list[tuple[list[int], int | None, asyncio.Future]]] = defaultdict(list)
            for item in items:
                groups[item[1]].append(item)
            for top_k, group in groups.items():
                live = [g for g in group if not g[2].cancelled()]
                if not live:
                    continue
                self.stats.batches += 1
                try:
                    results = await loop.run_in_executor(self.pool, self.scorer.score, [g[0] for g in live], top_k)
                    if len(results) != len(live):
                        raise RuntimeError(f"scorer returned {len(results)} results for {len(live)} sequences")
                except Exception as exc:  # noqa: BLE001 -- reported to each waiting request as a 500
                    for _, _, fut in live:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, _, fut), res in zip(live, results):
                    if not fut.done():
                        fut.set_result(res)


def _bad(stats: ServerStats, message: str, status: int = 400) -> web.Response:
    stats.errors[status] += 1
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


def _validate(body: Any, vocab: int) -> tuple[list[list[int]], bool, int | None, bool] | str:
    """(sequences, batched, top_k, with_text) or an error message."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if body.get("text") is not None and body.get("input_ids") is None:
        return "this scoring server needs input_ids (it does not tokenize text)"
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        return "sampling_params must be an object"
    if params.get("max_new_tokens") != 0:
        return (
            f"scoring-only server: sampling_params.max_new_tokens must be 0 (prefill-only), "
            f"got {params.get('max_new_tokens')!r}"
        )
    if body.get("return_logprob") is not True:
        return "scoring-only server: return_logprob must be true"
    if body.get("logprob_start_len", 0) != 0:
        return f"logprob_start_len must be 0, got {body.get('logprob_start_len')!r}"
    top_k = body.get("top_logprobs_num") or None
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        return f"top_logprobs_num must be a non-negative integer, got {top_k!r}"
    with_text = bool(body.get("return_text_in_logprobs", False))
    raw = body.get("input_ids")
    batched = isinstance(raw, list) and bool(raw) and all(isinstance(r, list) for r in raw)
    seqs = raw if batched else [raw]
    for n, seq in enumerate(seqs):
        if not isinstance(seq, list) or not seq:
            return f"input_ids[{n}] must be a non-empty list of token ids" if batched else "input_ids must be a non-empty list"
        for i, t in enumerate(seq):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                return f"input_ids{f'[{n}]' if batched else ''}[{i}] = {t!r} is not a token id in [0, {vocab})"
    return seqs, batched, top_k, with_text


async def _generate(request: web.Request) -> web.Response:
    app = request.app
    stats, scorer, batcher = app[STATS_KEY], app[SCORER_KEY], app[BATCHER_KEY]
    stats.requests += 1
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _bad(stats, f"malformed JSON body: {exc}")
        checked = _validate(body, scorer.vocab_size())
        if isinstance(checked, str):
            return _bad(stats, checked)
        seqs, batched, top_k, with_text = checked
        stats.sequences += len(seqs)
        try:
            scores = await asyncio.gather(*(batcher.submit(s, top_k) for s in seqs))  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001
            return _bad(stats, f"scoring failed: {type(exc).__name__}: {exc}", status=500)
        out = []
        for seq, sc in zip(seqs, scores):
            texts = scorer.token_texts(seq) if with_text else None
            out.append(build_response(seq, sc, texts, top_k, uuid.uuid4().hex))
        return web.json_response(out if batched else out[0])
    finally:
        stats.in_flight -= 1


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _health_generate(request: web.Request) -> web.Response:
    try:
        await request.app[BATCHER_KEY].submit([0, 0], None)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001
        return web.Response(status=503, text=f"scorer failed: {exc}")
    return web.Response(status=200)


async def _model_info(request: web.Request) -> web.Response:
    scorer = request.app[SCORER_KEY]
    info = {"is_generation": True, "vocab_size": scorer.vocab_size(), **scorer.model_info()}
    info.setdefault("model_path", None)
    info.setdefault("tokenizer_path", None)
    info.setdefault("tokenizer_fingerprint", None)
    return web.json_response(info)


def make_app(scorer: Scorer, *, max_batch: int = 16, max_wait_ms: float = 5.0) -> web.Application:
    """The aiohttp application serving `scorer` (batching up to `max_batch` sequences or `max_wait_ms`)."""
    app = web.Application(client_max_size=256 * 1024 * 1024)
    stats = ServerStats()
    app[SCORER_KEY] = scorer
    app[STATS_KEY] = stats

    async def _lifecycle(app: web.Application):
        batcher = _Batcher(scorer, stats, max_batch, max_wait_ms / 1000.0)
        app[BATCHER_KEY] = batcher
        batcher.task = asyncio.create_task(batcher.run())
        yield
        batcher.task.cancel()
        batcher.pool.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/generate", _generate)
    app.router.add_get("/health", _health)
    app.router.add_get("/health_generate", _health_generate)
    app.router.add_get("/get_model_info", _model_info)
    return app


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
    print(f"camopd teacher server listening on {host}:{real_port}", flush=True)
    if ready_file:
        write_ready_file(ready_file, host, real_port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        print("camopd teacher server stopped", flush=True)


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
    """A `camopd serve-teacher` subprocess on this machine (tests, benchmarks): its process, URL and log file."""

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
    """Start `n` serve-teacher replicas of `checkpoint` at once (port 0) and wait for each one's ready file."""
    pending = []
    for i in range(n):
        ready, log = os.path.join(workdir, f"replica{i}.ready"), os.path.join(workdir, f"replica{i}.log")
        if os.path.exists(ready):
            os.remove(ready)
        cmd = [sys.executable, "-m", "megatron_camopd.cli", "serve-teacher", "--checkpoint", str(checkpoint),
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
                    raise RuntimeError(f"teacher replica {checkpoint} did not start:\n{f.read()[-3000:]}")
            time.sleep(0.2)
        with open(ready) as f:
            replicas.append(LocalReplica(proc, "http://" + f.read().strip(), log))
    return replicas


def serve_main(argv: list[str] | None = None) -> int:
    """`camopd serve-teacher --checkpoint DIR [--tokenizer DIR] [--host H] [--port P] [--ready-file F]`."""
    parser = argparse.ArgumentParser(prog="camopd serve-teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a HuggingFace dir (config.json + weights) or a camopd checkpoint (root or iter_* dir)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (see --ready-file)")
    parser.add_argument("--ready-file", default=None, help="write host:port here (atomically) once listening")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    from .megatron_scorer import load_any_scorer

    scorer = load_any_scorer(args.checkpoint, args.tokenizer)
    run_server(scorer, args.host, args.port, args.ready_file, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
