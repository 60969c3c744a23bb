"""`HttpTeacher`: a teacher served over SGLang's `/generate` scoring protocol, by a pool of replicas.

One POST per sample, at most `max_in_flight` at once. The samples of one prompt share its prefix in the server's
radix cache: they go to the same replica (affinity by the prompt's tokens; other prompts spread across replicas),
and while the first of them is in flight the others wait for it, so the server prefills the prompt once and
serves it from the cache to the rest (SGLang schedules a burst of same-prefix requests into one batch, where none
finds the prefix cached yet; `prefix_cached_tokens` counts what the servers report as cached; measured by
`tools/bench_teacher_prefix.py`). The client works from sync
code (`score_batch`) and from any asyncio loop (`score`, `score_many`). Replica selection, failover, retries with
backoff, health probes and the all-dead deadline are `remote.replicas.ReplicaPool`'s (shared with the student's rollout
servers): a malformed or non-finite answer (see `protocol.py`) is retried on another replica, then the sample is
reported failed -- never lost, never duplicated; when every replica has been dead for `dead_deadline_s`, requests
fail with a `TeacherError` naming the teacher and its URLs (never hang).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator, Hashable
from typing import Any

from ..config.serving import context_for_inputs, server_limits
from ..errors import TeacherError
from ..remote.replicas import Replica, ReplicaPool
from .base import TeacherScores, check_start
from .protocol import build_request, parse_meta, parse_scores, score_request

__all__ = ["HttpTeacher", "Replica"]


class HttpTeacher:
    """A remote teacher (SGLang or `camopd serve`) behind one or more replica URLs or a discovery file."""

    def __init__(self, name: str, urls: list[str] | None = None, **pool: Any):
        """`pool`: `ReplicaPool`'s options (discovery_file, timeout_s, retries, backoff_s, max_in_flight,
        health_interval_s, health_timeout_s, dead_deadline_s, seed, ...), with its defaults."""
        self.name = name
        self._pool = ReplicaPool(f"teacher {name}", urls, error=TeacherError, **pool)
        # the served model's vocab_size, set by the tokenizer check (teachers/tokcheck.py): SGLang echoes input
        # ids >= vocab_size - 1 as 0, which the response checks then tolerate (protocol.py)
        self.echo_vocab_size: int | None = None
        self._prefilling: dict[int, asyncio.Event] = {}  # prompt key -> set when its first sample is answered
        self.prefix_cached_tokens = 0  # the prompt tokens the servers served from their prefix cache (meta_info)

    # ------------------------------------------------------------------ pool views (logs and tests)
    @property
    def urls(self) -> list[str]:
        return self._pool.urls

    @property
    def in_flight(self) -> int:
        return self._pool.in_flight

    @property
    def max_in_flight_seen(self) -> int:
        return self._pool.max_in_flight_seen

    def live_urls(self) -> list[str]:
        return self._pool.live_urls()

    def replica_stats(self) -> dict[str, Replica]:
        """Per-URL counters (a snapshot)."""
        return self._pool.replica_stats()

    # ------------------------------------------------------------------ the wire protocol (a subclass's seam)
    SCORE_PATH = "/generate"
    # hold a prompt's other samples back until its first is answered (SGLang then serves the prompt from its radix
    # cache); a server that never reads the cache for these requests (vLLM with prompt_logprobs) gains nothing
    PREFIX_HOLDBACK = True

    def _score_body(self, ids: list[int], start: int, top_k: int | None) -> dict[str, Any]:
        return score_request(ids, start, top_k)

    def _parse_score(
        self, obj: Any, ids: list[int], start: int, top_k: int | None, body: dict[str, Any], url: str
    ) -> TeacherScores:
        first = body["logprob_start_len"]
        out = parse_scores(obj, ids, start, top_k, f"teacher {self.name} at {url}", self.echo_vocab_size, first)
        cached = obj["meta_info"].get("cached_tokens")
        if isinstance(cached, int):
            self.prefix_cached_tokens += cached
        return out

    async def _score(self, ids: list[int], start: int, top_k: int | None) -> TeacherScores:
        check_start(ids, start, f"teacher {self.name}")
        body = self._score_body(ids, start, top_k)
        key = hash(tuple(ids[:start]))  # the prompt (ints hash alike in every process)
        ahead = self._prefilling.get(key) if self.PREFIX_HOLDBACK else None
        own = None
        if ahead is not None:
            await ahead.wait()  # the prompt's first sample is being prefilled: find it cached afterwards
        elif self.PREFIX_HOLDBACK:
            own = self._prefilling[key] = asyncio.Event()

        def check(obj: Any, url: str) -> TeacherScores:
            return self._parse_score(obj, ids, start, top_k, body, url)

        try:
            return await self._pool.with_retries(body, check, path=self.SCORE_PATH, affinity=key)
        finally:
            if own is not None:
                own.set()
                del self._prefilling[key]

    # ------------------------------------------------------------------ public API
    async def score(self, ids: list[int], start: int, top_k: int | None = None) -> TeacherScores:
        """Scores of `ids[start:]`; awaitable from any event loop."""
        return await self._pool.run(self._score(list(ids), start, top_k))

    def score_batch(self, seqs: list[list[int]], starts: list[int], top_k: int | None = None) -> list[TeacherScores]:
        """Scores of every sequence, in order (requests run concurrently); `TeacherError` if any sample failed."""
        if len(seqs) != len(starts):
            raise TeacherError(f"teacher {self.name}: {len(seqs)} sequences but {len(starts)} starts")

        async def _all() -> list[Any]:
            return await asyncio.gather(
                *(self._score(list(s), st, top_k) for s, st in zip(seqs, starts)), return_exceptions=True
            )

        results = self._pool.call(_all())
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:
            raise TeacherError(
                f"teacher {self.name}: {len(failed)}/{len(seqs)} samples failed (indices"
                f" {[i for i, _ in failed][:20]}); first: {failed[0][1]}"
            )
        return results

    async def score_many(
        self, items: AsyncIterable[tuple[Hashable, list[int], int]] | asyncio.Queue, top_k: int | None = None
    ) -> AsyncIterator[tuple[Hashable, TeacherScores | BaseException]]:
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

        def _finished(key: Hashable, task: asyncio.Task) -> None:
            done.put_nowait((key, task))

        async def _feed() -> None:
            nonlocal submitted, feeding, feed_error
            try:
                async for key, ids, start in _source():
                    task = asyncio.ensure_future(self.score(ids, start, top_k))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    task.add_done_callback(functools.partial(_finished, key))
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
        """`GET /model_info` of `url` (default: a live replica)."""
        return self._info("/model_info", url)

    def server_info(self, url: str | None = None) -> dict[str, Any]:
        """`GET /server_info` of `url` (default: a live replica): its limits, parallelism and version."""
        return self._info("/server_info", url)

    def max_input_tokens(self, url: str) -> int | None:
        """The longest input `url` accepts (None when it does not say): SGLang's `/server_info` limits."""
        return server_limits(self.server_info(url))[1]

    def context_needed(self, n_tokens: int) -> tuple[str, int]:
        """The server flag and the value that make inputs of `n_tokens` fit (for error messages)."""
        return "--context-length", context_for_inputs(n_tokens)

    def _info(self, path: str, url: str | None) -> dict[str, Any]:
        async def _get() -> dict[str, Any]:
            target = url or (await self._pool.pick()).url
            info = await self._pool.get_json(target, path)
            if not isinstance(info, dict):
                raise TeacherError(f"teacher {self.name} at {target}: {path} answered {str(info)[:100]!r}")
            return dict(info)

        return self._pool.call(_get())

    def probe(self, ids: list[int], url: str | None = None, vocab_size: int | None = None) -> list[str | None]:
        """Per-token texts the server reports for `ids` (`return_text_in_logprobs`), after checking its answer
        (`vocab_size`: the served model's, for SGLang's clip of echoed ids -- see `protocol.py`)."""
        body = build_request(list(ids), None, with_text=True)
        where = f"teacher {self.name} probe"
        check = lambda obj, u: parse_meta(obj, ids, None, f"{where} at {u}", vocab_size)[1]  # noqa: E731
        return self._pool.call(self._pool.with_retries(body, check, url))

    def wait_ready(self, timeout_s: float) -> None:
        """Block until at least one replica answers `GET /health` with 200; `TeacherError` after `timeout_s`."""
        self._pool.wait_ready(timeout_s)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> HttpTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
