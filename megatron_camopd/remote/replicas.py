"""`ReplicaPool`: the client side of a pool of SGLang-protocol HTTP servers (teachers or student rollout servers).

Shared by `teachers.http.HttpTeacher` (scoring) and `rollout.sglang.SglangSampler` (generation, weight sync). An
aiohttp session lives in a private event-loop thread, so the pool works from sync code (`call`), from any asyncio
loop (`run`), and its health probes keep running between calls. Replicas are visited in a seeded, shuffled
round-robin. A replica that fails (connection error, 5xx, timeout) is marked dead and taken out of the rotation; a
background `GET /health` probe brings it back (after an optional `revive_check`, e.g. "has the current weights").
A failed request is retried with exponential backoff on another replica; a malformed answer (the caller's
`check` raises) is retried too, then reported failed -- never lost, never duplicated. At most `max_in_flight`
requests run at once. When every replica has been dead for `dead_deadline_s`, requests fail with the pool's
error type naming what it serves and its URLs (never hang).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import CamopdError
from .discovery import read_discovery_file, wait_for_discovery

# one `GET /health` may take this long: SGLang's /health is its generating health check (a one-token generation,
# 1-20 s on a busy server), so a short probe timeout would mark healthy-but-busy servers dead
HEALTH_TIMEOUT_S = 30.0


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


class Unreachable(Exception):
    """Connection error / 5xx / timeout: the replica is marked dead."""


class BadAnswer(Exception):
    """A 200 answer that is not usable (not JSON, or refused by the caller's check): retried elsewhere."""


class Refused(Exception):
    """A 4xx answer: our request is wrong, retrying will not help."""


class ReplicaPool:
    """Replicas of one service (`what`, e.g. "teacher general"), reached over HTTP with failover and retries."""

    def __init__(
        self,
        what: str,
        urls: list[str] | None = None,
        *,
        error: type[CamopdError] = CamopdError,
        discovery_file: str | None = None,
        discovery_timeout_s: float = 300.0,
        timeout_s: float = 300.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_in_flight: int = 64,
        health_interval_s: float = 2.0,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        dead_deadline_s: float = 120.0,
        seed: int = 0,
        revive_check: Callable[[str], Awaitable[bool]] | None = None,
    ):
        self.what, self.error = what, error
        if not urls and not discovery_file:
            raise error(f"{what}: give replica urls or a discovery_file")
        if max_in_flight < 1 or retries < 0:
            raise error(f"{what}: max_in_flight must be >= 1 and retries >= 0")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_in_flight, self.health_interval_s, self.dead_deadline_s = (
            max_in_flight,
            health_interval_s,
            dead_deadline_s,
        )
        self.health_timeout_s = health_timeout_s
        self.discovery_file = discovery_file
        self.revive_check = revive_check
        found = list(urls or []) + (wait_for_discovery(discovery_file, discovery_timeout_s) if discovery_file else [])
        self.replicas: dict[str, Replica] = {}
        for u in found:
            self.replicas.setdefault(u.rstrip("/"), Replica(u.rstrip("/")))
        self._rng = random.Random(seed)
        self._order: list[Replica] = []
        self._cursor = 0
        self._all_dead_since: float | None = None
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=f"pool-{what}")
        self._thread.start()
        self.call(self._setup())

    # ------------------------------------------------------------------ event-loop plumbing
    async def _setup(self) -> None:
        self._sem = asyncio.Semaphore(self.max_in_flight)
        self._revived = asyncio.Event()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_in_flight + 8))
        self._probe_task = asyncio.create_task(self._probe_loop())

    def submit(self, coro: Any):
        """Schedule `coro` on the pool's loop; a `concurrent.futures.Future`."""
        if self.closed:
            coro.close()
            raise self.error(f"{self.what}: client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run `coro` on the pool's loop and wait for its result (from sync code)."""
        return self.submit(coro).result(timeout)

    async def run(self, coro: Any) -> Any:
        """Await `coro` on the pool's loop from any other event loop."""
        return await asyncio.wrap_future(self.submit(coro))

    @property
    def urls(self) -> list[str]:
        return list(self.replicas)

    def live_urls(self) -> list[str]:
        return [r.url for r in self.replicas.values() if r.alive]

    def replica_stats(self) -> dict[str, Replica]:
        """Per-URL counters (a snapshot)."""
        return {u: Replica(**vars(r)) for u, r in self.replicas.items()}

    # ------------------------------------------------------------------ replica selection and health
    def _next_alive(self, exclude: str | None, affinity: int | None = None) -> Replica | None:
        alive = [r for r in self.replicas.values() if r.alive]
        if not alive:
            return None
        if affinity is not None:  # a fixed place on the ring of every known URL, then the next live one
            ring = sorted(self.replicas)
            for k in range(len(ring)):
                r = self.replicas[ring[(affinity + k) % len(ring)]]
                if r.alive and (r.url != exclude or len(alive) == 1):
                    return r
        for _ in range(2 * len(self.replicas) + 1):
            if self._cursor >= len(self._order):
                self._order = list(self.replicas.values())
                self._rng.shuffle(self._order)
                self._cursor = 0
            r = self._order[self._cursor]
            self._cursor += 1
            if r.alive and (r.url != exclude or len(alive) == 1):
                return r
        return alive[0]

    async def pick(self, exclude: str | None = None, affinity: int | None = None) -> Replica:
        """A live replica (not `exclude` when another is alive); waits for a revival up to the deadline.
        `affinity`: requests with the same value go to the same replica while it lives (its prefix cache)."""
        loop = asyncio.get_running_loop()
        while True:
            r = self._next_alive(exclude, affinity)
            if r is not None:
                return r
            if self._all_dead_since is None:
                self._all_dead_since = loop.time()
            left = self.dead_deadline_s - (loop.time() - self._all_dead_since)
            if left <= 0:
                errors = "; ".join(f"{x.url}: {x.last_error}" for x in self.replicas.values())
                raise self.error(
                    f"{self.what}: all replicas {self.urls} unreachable for {self.dead_deadline_s:.0f}s"
                    f" (last errors: {errors})"
                )
            self._revived.clear()
            try:
                await asyncio.wait_for(self._revived.wait(), timeout=left)
            except TimeoutError:
                pass

    def mark_dead(self, r: Replica, err: str) -> None:
        """Take `r` out of the rotation (the health probe may bring it back)."""
        r.failures += 1
        r.last_error = err
        if r.alive:
            r.alive = False
            r.deaths += 1
            if self._all_dead_since is None and not any(x.alive for x in self.replicas.values()):
                self._all_dead_since = asyncio.get_running_loop().time()

    async def health_ok(self, url: str) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.timeout_s, self.health_timeout_s))
            async with self.session.get(f"{url}/health", timeout=timeout) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _revive(self, r: Replica) -> None:
        if not await self.health_ok(r.url):
            return
        if self.revive_check is not None:
            try:
                if not await self.revive_check(r.url):
                    return
            except Exception as exc:  # noqa: BLE001 -- a failing check keeps the replica out; recorded
                r.last_error = f"revive check: {type(exc).__name__}: {exc}"
                return
        r.alive = True
        r.revivals += 1

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            if self.discovery_file:
                try:
                    for u in read_discovery_file(self.discovery_file):
                        self.replicas.setdefault(u, Replica(u))
                except CamopdError:
                    pass  # a half-edited file: keep the replicas we know
            for r in [r for r in self.replicas.values() if not r.alive]:
                await self._revive(r)
            if any(r.alive for r in self.replicas.values()):
                self._all_dead_since = None
                self._revived.set()

    # ------------------------------------------------------------------ one request
    async def request(
        self,
        r: Replica,
        path: str,
        body: dict[str, Any] | None = None,
        method: str = "POST",
        timeout_s: float | None = None,
    ) -> Any:
        """One HTTP request to `r` (JSON in, JSON or text out); Unreachable / Refused / BadAnswer on failure."""
        r.requests += 1
        try:
            async with self._sem:
                self.in_flight += 1
                self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
                try:
                    timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
                    async with self.session.request(method, f"{r.url}{path}", json=body, timeout=timeout) as resp:
                        raw = await resp.read()
                        status, ctype = resp.status, resp.content_type
                finally:
                    self.in_flight -= 1
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
        if status >= 500:
            raise Unreachable(f"HTTP {status}: {raw[:200].decode(errors='replace')}")
        if status != 200:
            raise Refused(f"HTTP {status}: {raw[:300].decode(errors='replace')}")
        if ctype != "application/json":
            return raw.decode(errors="replace")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise BadAnswer(f"response is not JSON: {exc}") from exc

    async def with_retries(
        self,
        body: dict[str, Any],
        check: Callable[[Any, str], Any],
        url: str | None = None,
        path: str = "/generate",
        affinity: int | None = None,
    ) -> Any:
        """POST `body` to `path` (of `url`, or of the pool with failover, `affinity` as in `pick`) and return
        `check(response, url)`, retrying on unreachable replicas and on answers `check` refuses (by raising
        BadAnswer or the pool's error type). A 4xx is not retried: it raises the pool's error naming the replica."""
        last_err = ""
        last_url: str | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            r = self.replicas[url] if url else await self.pick(exclude=last_url, affinity=affinity)
            last_url = r.url
            try:
                return check(await self.request(r, path, body), r.url)
            except Unreachable as exc:
                self.mark_dead(r, str(exc))
                last_err = f"{r.url}: {exc}"
            except Refused as exc:
                raise self.error(f"{self.what} at {r.url} refused the request: {exc}") from None
            except (BadAnswer, self.error) as exc:
                r.bad_answers += 1
                r.last_error = str(exc)
                last_err = f"{r.url}: {exc}"
        raise self.error(f"{self.what}: sample failed after {self.retries + 1} attempts; last: {last_err}")

    async def get_json(self, url: str, path: str) -> Any:
        """`GET path` of one replica; the pool's error on any failure."""
        try:
            return await self.request(self.replicas[url], path, method="GET")
        except (Unreachable, Refused, BadAnswer) as exc:
            raise self.error(f"{self.what} at {url}: GET {path} failed: {exc}") from None

    # ------------------------------------------------------------------ readiness and shutdown
    def wait_ready(self, timeout_s: float) -> None:
        """Block until at least one replica answers `GET /health` with 200; the pool's error after `timeout_s`."""

        async def _check_all() -> list[bool]:
            return list(await asyncio.gather(*(self.health_ok(u) for u in self.urls)))

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            oks = self.call(_check_all())
            for u, ok in zip(self.urls, oks):
                self.replicas[u].alive = ok
            if any(oks):
                return
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        raise self.error(f"{self.what}: no replica of {self.urls} became healthy within {timeout_s:.0f}s")

    def close(self) -> None:
        if self.closed:
            return

        async def _shutdown() -> None:
            self._probe_task.cancel()
            await self.session.close()

        try:
            asyncio.run_coroutine_threadsafe(_shutdown(), self.loop).result(10)
        finally:
            self.closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
