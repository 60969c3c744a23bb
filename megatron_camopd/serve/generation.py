"""`POST /generate` of `camopd serve`: scoring (max_new_tokens 0) and sampling, batched server-side.

Requests are parsed by `generate_api.parse_generate` (a 400 naming the field otherwise) into items; items from
concurrent requests are collected for up to `max_wait_ms` (at most `max_batch`), grouped -- scoring by
`top_logprobs_num`, sampling by sampling parameters -- and each group runs as one model call in the server's
single worker thread (which also applies weight updates, so weights never change under a batch). Sampling uses
the model's `generate` (the KV-cached megatron engine; a scorer without it refuses sampling requests); prompt
log-probs and top log-probs of a sampled answer come from one scoring pass over prompt + output.

`/pause_generation` holds new batches until `/continue_generation`; with mode `abort` (SGLang's default) the
queued items and the batch running at that moment are answered with finish_reason `abort`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .generate_api import ApiError, GenItem, apply_stop_strings, build_answer, needs_scores, parse_generate


@dataclass
class ServeState:
    """What the endpoints share: the model, the single worker thread, the pause switch, the weight version."""

    model: Any
    pool: ThreadPoolExecutor
    context_len: int
    running: asyncio.Event = field(default_factory=asyncio.Event)  # set: batches may start
    abort_epoch: int = 0  # bumped by pause(mode=abort): batches started before it answer abort
    weight_version: str = "default"

    @property
    def can_generate(self) -> bool:
        return hasattr(self.model, "generate")

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)


STATE_KEY = web.AppKey("serve_state", ServeState)


@dataclass
class _Job:
    item: GenItem
    fut: asyncio.Future


class WorkBatcher:
    """Collects items from concurrent requests and runs them in groups on the worker thread."""

    def __init__(self, state: ServeState, stats: Any, max_batch: int, max_wait_s: float) -> None:
        self.state, self.stats = state, stats
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending: list[_Job] = []  # collected, waiting for the pause to end
        self.task: asyncio.Task | None = None

    async def submit(self, item: GenItem) -> dict[str, Any]:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(item, fut))
        return await fut

    def abort_waiting(self) -> int:
        """Answer every collected or queued item with finish_reason abort (pause mode abort)."""
        jobs = self.pending + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        self.pending = []
        for job in jobs:
            if not job.fut.done():
                job.fut.set_result(_aborted(job.item, self.state.weight_version))
        return len(jobs)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.pending = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(self.pending) < self.max_batch:
                try:
                    self.pending.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            await self.state.running.wait()
            jobs, self.pending = [j for j in self.pending if not j.fut.done()], []
            groups: dict[tuple, list[_Job]] = defaultdict(list)
            for job in jobs:
                it = job.item
                groups[("score", it.top_logprobs_num) if it.max_new == 0 else ("gen", it.group_key())].append(job)
            for key, group in groups.items():
                self.stats.batches += 1
                epoch = self.state.abort_epoch
                try:
                    answers = await loop.run_in_executor(self.state.pool, self._execute, key[0],
                                                         [j.item for j in group])
                except Exception as exc:  # noqa: BLE001 -- reported to each waiting request as a 500
                    for job in group:
                        if not job.fut.done():
                            job.fut.set_exception(exc)
                    continue
                for job, ans in zip(group, answers):
                    if epoch != self.state.abort_epoch:
                        ans = _aborted(job.item, self.state.weight_version)
                    if not job.fut.done():
                        job.fut.set_result(ans)

    # ------------------------------------------------------------------ in the worker thread
    def _execute(self, kind: str, items: list[GenItem]) -> list[dict[str, Any]]:
        model, tok, t0 = self.state.model, self.state.tokenizer, time.monotonic()
        version = self.state.weight_version
        if kind == "score":
            need = [it for it in items if needs_scores(it)]
            top = items[0].top_logprobs_num or None
            scores = dict(zip(map(id, need), model.score([it.ids for it in need], top))) if need else {}
            return [build_answer(it, output=[], output_lps=[], finish={"type": "length", "length": 0},
                                 scores=scores.get(id(it)), tokenizer=tok, weight_version=version,
                                 latency_s=time.monotonic() - t0) for it in items]
        first = items[0]
        rollouts = model.generate([it.ids for it in items], first.params, [it.seed for it in items],
                                  ignore_eos=first.ignore_eos)
        outs = []
        for it, r in zip(items, rollouts):
            ids, lps = list(r.response_ids), r.logprobs.tolist()
            finish: dict[str, Any] = ({"type": "stop", "matched": ids[-1]} if r.finish_reason == "stop" and ids
                                      else {"type": "length", "length": len(ids)})
            cut = apply_stop_strings(tok, ids, it.stop_strs)
            if cut is not None:
                ids, lps = ids[: cut[0]], lps[: cut[0]]
                finish = {"type": "stop", "matched": cut[1]}
            outs.append((it, ids, lps, finish))
        need = [(it, ids) for it, ids, _, _ in outs if needs_scores(it)]
        top = max((it.top_logprobs_num for it, _ in need), default=0) or None
        scored = model.score([it.ids + ids for it, ids in need], top) if need else []
        by_item = {id(it): sc for (it, _), sc in zip(need, scored)}
        answers = []
        for it, ids, lps, finish in outs:
            sc = by_item.get(id(it))
            if sc is not None and sc.topk_ids is not None and it.top_logprobs_num < sc.topk_ids.shape[1]:
                k = it.top_logprobs_num
                sc = type(sc)(sc.logprobs, sc.topk_ids[:, :k], sc.topk_logprobs[:, :k]) if k else \
                    type(sc)(sc.logprobs)
            answers.append(build_answer(it, output=ids, output_lps=lps, finish=finish, scores=sc, tokenizer=tok,
                                        weight_version=version, latency_s=time.monotonic() - t0))
        return answers


def _aborted(item: GenItem, version: str) -> dict[str, Any]:
    meta = {"id": item.rid, "finish_reason": {"type": "abort", "message": "generation paused (mode abort)"},
            "prompt_tokens": len(item.ids), "completion_tokens": 0, "cached_tokens": 0, "weight_version": version}
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
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _bad(stats, f"malformed JSON body: {exc}")
        model = state.model
        try:
            items, batched = parse_generate(body, vocab=model.vocab_size(), context_len=state.context_len,
                                            tokenizer=state.tokenizer)
            if not state.can_generate:
                for i, it in enumerate(items):
                    if it.max_new:
                        raise ApiError(f"sampling_params{f'[{i}]' if batched else ''}.max_new_tokens",
                                       f"this server only scores (--backend hf): max_new_tokens must be 0, got "
                                       f"{it.max_new} (a missing max_new_tokens means 128)")
        except ApiError as exc:
            return _bad(stats, str(exc))
        stats.sequences += len(items)
        try:
            answers = await asyncio.gather(*(batcher.submit(it) for it in items))
        except Exception as exc:  # noqa: BLE001
            return _bad(stats, f"generation failed: {type(exc).__name__}: {exc}", status=500)
        return web.json_response(answers if batched else answers[0])
    finally:
        stats.in_flight -= 1
