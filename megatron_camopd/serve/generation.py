"""`POST /generate` of `camopd serve`: scoring (max_new_tokens 0) and sampling, batched server-side.

Requests are parsed by `generate_api.parse_generate` (a 400 naming the field otherwise) into items; items from
concurrent requests are collected for up to `max_wait_ms` (at most `max_batch`), grouped -- scoring by
`top_logprobs_num`, sampling by sampling parameters -- and each group runs as one model call on one of the
server's `workers` threads. Items are taken round-robin over the requests that have work queued, so a request of
many prompts interleaves with short ones instead of holding them, and with several workers one long batch does
not hold the others (torch releases the GIL in its ops). Batches share the model (`ModelLock`); a weight update
(`state.pool`, the `ExclusiveExecutor`) waits for the running batches and has the model alone, so weights never
change under a batch. Every item is computed on its own (same answer whichever worker or batch serves it, up to
the padding tolerance batching already had). Sampling uses the model's `generate` (the KV-cached megatron engine;
a scorer without it refuses sampling requests); prompt log-probs and top log-probs of a sampled answer come from
one scoring pass over prompt + output.

A request still unanswered after `request_timeout_s` gets a 504; its queued items are dropped and a running
scoring pass stops at the next micro-batch (a running sampling call is bounded by the context length).
`/pause_generation` holds new batches until `/continue_generation`; with mode `abort` (SGLang's default) the
queued items and the batches running at that moment are answered with finish_reason `abort`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .generate_api import ApiError, GenItem, apply_stop_strings, build_answer, needs_scores, parse_generate

BODY_KEY = web.RequestKey("camopd_json_body", object)  # the body the guard middleware decoded


class ModelLock:
    """Batches share the model, a weight update has it alone; a waiting update goes before new batches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ExclusiveExecutor(ThreadPoolExecutor):
    """One thread whose every task holds the model alone (weight updates, in submission order)."""

    def __init__(self, lock: ModelLock) -> None:
        super().__init__(max_workers=1, thread_name_prefix="model-update")
        self.lock = lock

    def submit(self, fn, /, *args, **kwargs):
        def alone() -> Any:
            with self.lock.exclusive():
                return fn(*args, **kwargs)

        return super().submit(alone)


@dataclass
class ServeState:
    """What the endpoints share: the model, its worker threads and update thread, the pause switch, the weight
    version and the limits of a request."""

    model: Any
    pool: ThreadPoolExecutor  # weight updates (an ExclusiveExecutor)
    context_len: int
    workers: ThreadPoolExecutor | None = None  # batches; None: the update thread
    lock: ModelLock = field(default_factory=ModelLock)
    request_timeout_s: float | None = None  # /generate answers 504 after this long
    running: asyncio.Event = field(default_factory=asyncio.Event)  # set: batches may start
    abort_epoch: int = 0  # bumped by pause(mode=abort): batches started before it answer abort
    weight_version: str = "default"
    update_session: bool = False  # between /begin_weight_update and /end_weight_update
    healthy: bool = True  # False after a health check that got no answer (SGLang's ServerStatus.UnHealthy)
    # SGLang's generating health check waits this long for an answer (SGLANG_HEALTH_CHECK_TIMEOUT, default 20 s)
    health_check_timeout_s: float = field(
        default_factory=lambda: float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", 20))
    )

    @property
    def can_generate(self) -> bool:
        return hasattr(self.model, "generate")

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)


STATE_KEY = web.AppKey("serve_state", ServeState)


@dataclass(eq=False)
class _Job:
    item: GenItem
    fut: asyncio.Future
    gone: bool = False  # its request was answered or given up: skip its work (read by the worker threads)


def _mark_gone(job: _Job, _fut: asyncio.Future) -> None:
    job.gone = True


class WorkBatcher:
    """Collects items from concurrent requests (round-robin over requests) and runs them in groups on the
    workers, at most `n_workers` batches at a time."""

    def __init__(self, state: ServeState, stats: Any, max_batch: int, max_wait_s: float, n_workers: int = 1) -> None:
        self.state, self.stats = state, stats
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queues: deque[deque[_Job]] = deque()  # one per request with items left, in round-robin order
        self.queued = 0
        self.wake = asyncio.Event()
        self.slots = asyncio.Semaphore(max(1, n_workers))
        self.busy = 0
        self.tasks: set[asyncio.Task] = set()
        self.task: asyncio.Task | None = None

    def submit_many(self, items: list[GenItem]) -> list[asyncio.Future]:
        """Queue the items of one request; one future per item."""
        loop = asyncio.get_running_loop()
        jobs = deque(_Job(it, loop.create_future()) for it in items)
        for job in jobs:
            job.fut.add_done_callback(functools.partial(_mark_gone, job))
        if jobs:
            self.queues.append(jobs)
            self.queued += len(jobs)
            self.wake.set()
        return [j.fut for j in jobs]

    async def submit(self, item: GenItem) -> dict[str, Any]:
        return await self.submit_many([item])[0]

    def abort_waiting(self) -> int:
        """Answer every queued item with finish_reason abort (pause mode abort)."""
        jobs = [j for q in self.queues for j in q]
        self.queues.clear()
        self.queued = 0
        for job in jobs:
            if not job.fut.done():
                job.fut.set_result(_aborted(job.item, self.state.weight_version))
        return len(jobs)

    def _take(self, n: int) -> list[_Job]:
        """Up to `n` live items, one per request in turn."""
        out: list[_Job] = []
        while self.queues and len(out) < n:
            q = self.queues.popleft()
            while q and q[0].fut.done():  # given up (timed out) or answered (aborted)
                self.stats.abandoned += q.popleft().fut.cancelled()
                self.queued -= 1
            if q:
                out.append(q.popleft())
                self.queued -= 1
            if q:
                self.queues.append(q)
        return out

    async def _wait(self, timeout: float | None) -> bool:
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.slots.acquire()  # a free worker
            try:
                while not self.queued:
                    await self._wait(None)
                deadline = loop.time() + self.max_wait_s
                while self.queued < self.max_batch and deadline > loop.time():
                    if not await self._wait(deadline - loop.time()):
                        break
                await self.state.running.wait()
                jobs = self._take(self.max_batch)
            except BaseException:
                self.slots.release()
                raise
            if not jobs:
                self.slots.release()
                continue
            task = asyncio.create_task(self._run_batch(jobs))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run_batch(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        self.busy += 1
        self.stats.max_busy_workers = max(self.stats.max_busy_workers, self.busy)
        try:
            groups: dict[tuple, list[_Job]] = defaultdict(list)
            for job in jobs:
                it = job.item
                groups[("score", it.top_logprobs_num) if it.max_new == 0 else ("gen", it.group_key())].append(job)
            for key, group in groups.items():
                group = [j for j in group if not j.gone]
                if not group:
                    continue
                self.stats.batches += 1
                epoch = self.state.abort_epoch
                try:
                    answers = await loop.run_in_executor(
                        self.state.workers or self.state.pool, self._execute, key[0], group
                    )
                except Exception as exc:  # noqa: BLE001 -- reported to each waiting request as a 500
                    for job in group:
                        if not job.fut.done():
                            job.fut.set_exception(exc)
                    continue
                for job, ans in zip(group, answers):
                    if epoch != self.state.abort_epoch:
                        ans = _aborted(job.item, self.state.weight_version)
                    if ans is None:
                        self.stats.abandoned += 1
                    elif not job.fut.done():
                        job.fut.set_result(ans)
        finally:
            self.busy -= 1
            self.slots.release()

    # ------------------------------------------------------------------ in a worker thread
    def _execute(self, kind: str, jobs: list[_Job]) -> list[dict[str, Any] | None]:
        """The answers of `jobs` (None for one given up meanwhile), holding the model shared."""
        with self.state.lock.shared():
            if kind == "score":
                return self._score(jobs)
            return self._sample(jobs)

    def _score_live(self, pairs: list[tuple[_Job, list[int]]], top: int | None) -> dict[int, Any]:
        """Scores of the (job, sequence) pairs, micro-batch by micro-batch, skipping jobs given up meanwhile."""
        model, out = self.state.model, dict[int, Any]()
        step = max(1, int(getattr(model, "micro_batch_size", 8) or 8))
        for i in range(0, len(pairs), step):
            live = [(j, seq) for j, seq in pairs[i : i + step] if not j.gone]
            if live:
                out.update(zip((id(j) for j, _ in live), model.score([seq for _, seq in live], top)))
        return out

    def _score(self, jobs: list[_Job]) -> list[dict[str, Any] | None]:
        tok, t0, version = self.state.tokenizer, time.monotonic(), self.state.weight_version
        need = [(j, j.item.ids) for j in jobs if needs_scores(j.item)]
        scores = self._score_live(need, jobs[0].item.top_logprobs_num or None) if need else {}
        return [
            None
            if needs_scores(j.item) and id(j) not in scores
            else build_answer(
                j.item,
                output=[],
                output_lps=[],
                finish={"type": "length", "length": 0},
                scores=scores.get(id(j)),
                tokenizer=tok,
                weight_version=version,
                latency_s=time.monotonic() - t0,
            )
            for j in jobs
        ]

    def _sample(self, jobs: list[_Job]) -> list[dict[str, Any] | None]:
        model, tok, t0 = self.state.model, self.state.tokenizer, time.monotonic()
        version = self.state.weight_version
        items = [j.item for j in jobs]
        first = items[0]
        rollouts = model.generate(
            [it.ids for it in items], first.params, [it.seed for it in items], ignore_eos=first.ignore_eos
        )
        outs = []
        for job, r in zip(jobs, rollouts):
            it = job.item
            ids, lps = list(r.response_ids), r.logprobs.tolist()
            finish: dict[str, Any] = (
                {"type": "stop", "matched": ids[-1]}
                if r.finish_reason == "stop" and ids
                else {"type": "length", "length": len(ids)}
            )
            cut = apply_stop_strings(tok, ids, it.stop_strs)
            if cut is not None:
                ids, lps = ids[: cut[0]], lps[: cut[0]]
                finish = {"type": "stop", "matched": cut[1]}
            outs.append((job, ids, lps, finish))
        need = [(job, job.item.ids + ids) for job, ids, _, _ in outs if needs_scores(job.item)]
        top = max((job.item.top_logprobs_num for job, _ in need), default=0) or None
        by_job = self._score_live(need, top) if need else {}
        answers: list[dict[str, Any] | None] = []
        for job, ids, lps, finish in outs:
            it, sc = job.item, by_job.get(id(job))
            if needs_scores(it) and sc is None:
                answers.append(None)  # given up while sampling
                continue
            if sc is not None and sc.topk_ids is not None and it.top_logprobs_num < sc.topk_ids.shape[1]:
                k = it.top_logprobs_num
                sc = type(sc)(sc.logprobs, sc.topk_ids[:, :k], sc.topk_logprobs[:, :k]) if k else type(sc)(sc.logprobs)
            answers.append(
                build_answer(
                    it,
                    output=ids,
                    output_lps=lps,
                    finish=finish,
                    scores=sc,
                    tokenizer=tok,
                    weight_version=version,
                    latency_s=time.monotonic() - t0,
                )
            )
        return answers


def _aborted(item: GenItem, version: str) -> dict[str, Any]:
    meta = {
        "id": item.rid,
        "finish_reason": {"type": "abort", "message": "generation paused (mode abort)"},
        "prompt_tokens": len(item.ids),
        "completion_tokens": 0,
        "cached_tokens": 0,
        "weight_version": version,
    }
    return {"text": "", "output_ids": [], "meta_info": meta}


def _bad(stats: Any, message: str, status: int = 400) -> web.Response:
    stats.errors[status] += 1
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


async def generate_handler(request: web.Request, stats: Any, batcher: WorkBatcher) -> web.Response:
    """`POST /generate` (SGLang's native generate API, non-streaming)."""
    state = request.app[STATE_KEY]
    stats.requests += 1
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        model = state.model
        try:
            if BODY_KEY not in request:
                raise ApiError("body", "empty request body: send a JSON object (SGLang's GenerateReqInput)")
            items, batched = parse_generate(
                request[BODY_KEY], vocab=model.vocab_size(), context_len=state.context_len, tokenizer=state.tokenizer
            )
            if not state.can_generate:
                for i, it in enumerate(items):
                    if it.max_new:
                        raise ApiError(
                            f"sampling_params{f'[{i}]' if batched else ''}.max_new_tokens",
                            f"this server only scores (--backend hf): max_new_tokens must be 0, got "
                            f"{it.max_new} (a missing max_new_tokens means 128)",
                        )
        except ApiError as exc:
            return _bad(stats, str(exc))
        stats.sequences += len(items)
        futs = batcher.submit_many(items)
        try:
            answers = await asyncio.wait_for(asyncio.gather(*futs), state.request_timeout_s)
        except TimeoutError:
            for fut in futs:
                fut.cancel()
            stats.timeouts += 1
            return _bad(
                stats,
                f"request timed out after {state.request_timeout_s:g} s (the server's "
                f"--request-timeout-s); its unfinished work was dropped",
                status=504,
            )
        except Exception as exc:  # noqa: BLE001
            for fut in futs:
                fut.cancel()
            return _bad(stats, f"generation failed: {type(exc).__name__}: {exc}", status=500)
        return web.json_response(answers if batched else answers[0])
    finally:
        stats.in_flight -= 1
