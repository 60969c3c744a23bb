"""`HttpTeacher`: a teacher served over SGLang's `/generate` scoring protocol, by a pool of replicas.

One POST per sample (spreads load across replicas), at most `max_in_flight` at once, on an aiohttp session that
lives in a private event-loop thread -- so the client works from sync code (`score_batch`), from any asyncio loop
(`score`, `score_many`), and its health probes keep running between calls. Replicas are visited in a seeded,
shuffled round-robin. A replica that fails (connection error, 5xx, timeout) is marked dead and taken out of the
rotation; a background `GET /health` probe brings it back. A failed sample is retried with exponential backoff on
another replica; a malformed or non-finite answer (see `protocol.py`) is retried too, then the sample is reported
failed -- never lost, never duplicated. When every replica has been dead for `dead_deadline_s`, requests fail
with a `TeacherError` naming the teacher and its URLs (never hang).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Hashable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import TeacherError
from .base import TeacherScores, check_start
from .discovery import read_discovery_file, wait_for_discovery
from .protocol import build_request, parse_meta, parse_scores


@dataclass
class Replica:
    """One server of the pool, with counters for logs and tests."""

    url: str
    alive: bool = True
    requests: int = 0  # HTTP requests sent
    failures: int = 0  # connection errors / 5xx / timeouts
    bad_answers: int = 0  # malformed or non-finite answers
    deaths: int = 0  # times marked dead
    revivals: int = 0  # times brought back by the health probe
    last_error: str = ""


class _Unreachable(Exception):
    """Connection error / 5xx / timeout: the replica is marked dead."""


class _BadAnswer(Exception):
    """A 200 answer that is not usable (not JSON): retried on another replica."""


class _Refused(Exception):
    """A 4xx answer: our request is wrong, retrying will not help."""


class HttpTeacher:
    """A remote teacher (SGLang or `camopd serve-teacher`) behind one or more replica URLs or a discovery file."""

    def __init__(
        self,
        name: str,
        urls: list[str] | None = None,
        *,
        discovery_file: str | None = None,
        discovery_timeout_s: float = 300.0,
        timeout_s: float = 300.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_in_flight: int = 64,
        health_interval_s: float = 2.0,
        dead_deadline_s: float = 120.0,
        seed: int = 0,
    ):
        if not urls and not discovery_file:
            raise TeacherError(f"teacher {name}: give replica urls or a discovery_file")
        if max_in_flight < 1 or retries < 0:
            raise TeacherError(f"teacher {name}: max_in_flight must be >= 1 and retries >= 0")
        self.name = name
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_in_flight, self.health_interval_s, self.dead_deadline_s = max_in_flight, health_interval_s, dead_deadline_s
        self.discovery_file = discovery_file
        found = list(urls or []) + (wait_for_discovery(discovery_file, discovery_timeout_s) if discovery_file else [])
        self._replicas: dict[str, Replica] = {}
        for u in found:
            self._replicas.setdefault(u.rstrip("/"), Replica(u.rstrip("/")))
        self._rng = random.Random(seed)
        self._order: list[Replica] = []
        self._cursor = 0
        self._all_dead_since: float | None = None
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"teacher-{name}")
        self._thread.start()
        self._call(self._setup())

    # ------------------------------------------------------------------ event-loop plumbing
    async def _setup(self) -> None:
        self._sem = asyncio.Semaphore(self.max_in_flight)
        self._revived = asyncio.Event()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_in_flight))
        self._probe_task = asyncio.create_task(self._probe_loop())

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._closed:
            coro.close()
            raise TeacherError(f"teacher {self.name}: client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def urls(self) -> list[str]:
        return list(self._replicas)

    def live_urls(self) -> list[str]:
        return [r.url for r in self._replicas.values() if r.alive]

    def replica_stats(self) -> dict[str, Replica]:
        """Per-URL counters (a snapshot)."""
        return {u: Replica(**vars(r)) for u, r in self._replicas.items()}

    # ------------------------------------------------------------------ replica selection and health
    def _next_alive(self, exclude: str | None) -> Replica | None:
        alive = [r for r in self._replicas.values() if r.alive]
        if not alive:
            return None
        for _ in range(2 * len(self._replicas) + 1):
            if self._cursor >= len(self._order):
                self._order = list(self._replicas.values())
                self._rng.shuffle(self._order)
                self._cursor = 0
            r = self._order[self._cursor]
            self._cursor += 1
            if r.alive and (r.url != exclude or len(alive) == 1):
                return r
        return alive[0]

    async def _pick(self, exclude: str | None) -> Replica:
        loop = asyncio.get_running_loop()
        while True:
            r = self._next_alive(exclude)
            if r is not None:
                return r
            if self._all_dead_since is None:
                self._all_dead_since = loop.time()
            left = self.dead_deadline_s - (loop.time() - self._all_dead_since)
            if left <= 0:
                errors = "; ".join(f"{x.url}: {x.last_error}" for x in self._replicas.values())
                raise TeacherError(
                    f"teacher {self.name}: all replicas {self.urls} unreachable for {self.dead_deadline_s:.0f}s"
                    f" (last errors: {errors})"
                )
            self._revived.clear()
            try:
                await asyncio.wait_for(self._revived.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass

    def _mark_dead(self, r: Replica, err: str) -> None:
        r.failures += 1
        r.last_error = err
        if r.alive:
            r.alive = False
            r.deaths += 1
            if self._all_dead_since is None and not any(x.alive for x in self._replicas.values()):
                self._all_dead_since = asyncio.get_running_loop().time()

    async def _health_ok(self, url: str) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.timeout_s, max(1.0, self.health_interval_s * 2)))
            async with self._session.get(f"{url}/health", timeout=timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            if self.discovery_file:
                try:
                    for u in read_discovery_file(self.discovery_file):
                        self._replicas.setdefault(u, Replica(u))
                except TeacherError:
                    pass  # a half-edited file: keep the replicas we know
            for r in [r for r in self._replicas.values() if not r.alive]:
                if await self._health_ok(r.url):
                    r.alive = True
                    r.revivals += 1
            if any(r.alive for r in self._replicas.values()):
                self._all_dead_since = None
                self._revived.set()

    # ------------------------------------------------------------------ one request
    async def _post(self, r: Replica, body: dict[str, Any]) -> Any:
        r.requests += 1
        try:
            async with self._sem:
                self.in_flight += 1
                self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
                try:
                    timeout = aiohttp.ClientTimeout(total=self.timeout_s)
                    async with self._session.post(f"{r.url}/generate", json=body, timeout=timeout) as resp:
                        raw = await resp.read()
                        status = resp.status
                finally:
                    self.in_flight -= 1
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
        if status >= 500:
            raise _Unreachable(f"HTTP {status}: {raw[:200].decode(errors='replace')}")
        if status != 200:
            raise _Refused(f"HTTP {status}: {raw[:300].decode(errors='replace')}")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _BadAnswer(f"response is not JSON: {exc}") from exc

    async def _with_retries(self, body: dict[str, Any], check: Any, url: str | None = None) -> Any:
        """POST `body` (to `url`, or to the pool with failover) and return `check(response)`, retrying."""
        last_err = ""
        last_url: str | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            r = self._replicas[url] if url else await self._pick(exclude=last_url)
            last_url = r.url
            try:
                return check(await self._post(r, body), r.url)
            except _Unreachable as exc:
                self._mark_dead(r, str(exc))
                last_err = f"{r.url}: {exc}"
            except _Refused as exc:
                raise TeacherError(f"teacher {self.name} at {r.url} refused the request: {exc}") from None
            except (_BadAnswer, TeacherError) as exc:
                r.bad_answers += 1
                r.last_error = str(exc)
                last_err = f"{r.url}: {exc}"
        raise TeacherError(f"teacher {self.name}: sample failed after {self.retries + 1} attempts; last: {last_err}")

    async def _score(self, ids: list[int], start: int, top_k: int | None) -> TeacherScores:
        check_start(ids, start, f"teacher {self.name}")
        body = build_request(list(ids), top_k)
        return await self._with_retries(
            body, lambda obj, url: parse_scores(obj, ids, start, top_k, f"teacher {self.name} at {url}")
        )

    # ------------------------------------------------------------------ public API
    async def score(self, ids: list[int], start: int, top_k: int | None = None) -> TeacherScores:
        """Scores of `ids[start:]`; awaitable from any event loop."""
        if self._closed:
            raise TeacherError(f"teacher {self.name}: client is closed")
        fut = asyncio.run_coroutine_threadsafe(self._score(list(ids), start, top_k), self._loop)
        return await asyncio.wrap_future(fut)

    def score_batch(self, seqs: list[list[int]], starts: list[int], top_k: int | None = None) -> list[TeacherScores]:
        """Scores of every sequence, in order (requests run concurrently); `TeacherError` if any sample failed."""
        if len(seqs) != len(starts):
            raise TeacherError(f"teacher {self.name}: {len(seqs)} sequences but {len(starts)} starts")

        async def _all() -> list[Any]:
            return await asyncio.gather(*(self._score(list(s), st, top_k) for s, st in zip(seqs, starts)),
                                        return_exceptions=True)

        results = self._call(_all())
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:
            raise TeacherError(
                f"teacher {self.name}: {len(failed)}/{len(seqs)} samples failed (indices"
                f" {[i for i, _ in failed][:20]}); first: {failed[0][1]}"
            )
        return results

    async def score_many(
        self, items: AsyncIterable[tuple[Hashable, list[int], int]] | asyncio.Queue, top_k: int | None = None
    ) -> AsyncIterator[tuple[Hashable, TeacherScores | Exception]]:
        """Score samples as they arrive and yield `(key, scores or exception)` as each finishes.

        `items` is an async iterable of `(key, ids, start)`, or an `asyncio.Queue` of them ended by `None`.
        Every submitted key is yielded exactly once (a failure is yielded as its `TeacherError`).
        """
        done: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Future] = set()
        submitted = 0
        feeding = True
        feed_error: BaseException | None = None

        async def _source() -> AsyncIterator[tuple[Hashable, list[int], int]]:
            if isinstance(items, asyncio.Queue):
                while (item := await items.get()) is not None:
                    yield item
            else:
                async for item in items:
                    yield item

        async def _feed() -> None:
            nonlocal submitted, feeding, feed_error
            try:
                async for key, ids, start in _source():
                    task = asyncio.ensure_future(self.score(ids, start, top_k))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    task.add_done_callback(lambda t, k=key: done.put_nowait((k, t)))
                    submitted += 1
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer
                feed_error = exc
            finally:
                feeding = False
                done.put_nowait(None)

        feeder = asyncio.ensure_future(_feed())
        yielded = 0
        try:
            while feeding or yielded < submitted:
                got = await done.get()
                if got is None:
                    continue
                key, task = got
                yielded += 1
                exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
                yield key, (exc if exc is not None else task.result())
            if feed_error is not None:
                raise feed_error
        finally:
            feeder.cancel()
            for t in list(pending):  # the consumer stopped early: do not leave requests behind
                t.cancel()

    def model_info(self, url: str | None = None) -> dict[str, Any]:
        """`GET /get_model_info` of `url` (default: a live replica)."""

        async def _get() -> dict[str, Any]:
            r = self._replicas[url] if url else await self._pick(exclude=None)
            try:
                timeout = aiohttp.ClientTimeout(total=self.timeout_s)
                async with self._session.get(f"{r.url}/get_model_info", timeout=timeout) as resp:
                    if resp.status != 200:
                        raise TeacherError(f"teacher {self.name} at {r.url}: /get_model_info answered {resp.status}")
                    return dict(await resp.json(content_type=None))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise TeacherError(f"teacher {self.name} at {r.url}: /get_model_info failed: {exc}") from exc

        return self._call(_get())

    def probe(self, ids: list[int], url: str | None = None) -> list[str | None]:
        """Per-token texts the server reports for `ids` (`return_text_in_logprobs`), after checking its answer."""
        body = build_request(list(ids), None, with_text=True)
        where = f"teacher {self.name} probe"
        return self._call(self._with_retries(body, lambda obj, u: parse_meta(obj, ids, None, f"{where} at {u}")[1], url))

    def wait_ready(self, timeout_s: float) -> None:
        """Block until at least one replica answers `GET /health` with 200; `TeacherError` after `timeout_s`."""
        async def _check_all() -> list[bool]:
            return list(await asyncio.gather(*(self._health_ok(u) for u in self.urls)))

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            oks = self._call(_check_all())
            for u, ok in zip(self.urls, oks):
                self._replicas[u].alive = ok
            if any(oks):
                return
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        raise TeacherError(f"teacher {self.name}: no replica of {self.urls} became healthy within {timeout_s:.0f}s")

    def close(self) -> None:
        if self._closed:
            return

        async def _shutdown() -> None:
            self._probe_task.cancel()
            await self._session.close()

        try:
            asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(10)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> HttpTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
