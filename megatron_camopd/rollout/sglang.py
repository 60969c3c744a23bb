"""The `sglang` rollout engine: the student served by SGLang rollout servers (or `camopd serve` on CPU), its
weights synced from the trainer after every optimizer step -- the production engine at scale.

Generation (`generate`): the model-parallel leader (TP=0, PP=0) of each DP rank sends one `POST /generate` per
sample of its slice (`sglang_protocol.py`), through a `ReplicaPool` (seeded shuffled round-robin, failover,
retries, bounded in-flight, dead-replica probes); a malformed or aborted answer is retried elsewhere and never
trained on; a sample that still fails comes back empty with `meta["error"]` (the step drops and counts it), and a
step where every sample failed is a `RolloutError`. Finished rollouts reach the other TP/PP ranks in small
broadcasts every `_POLL_S` while the rest are still generating, so `on_finish` fires on every rank as samples
finish (teacher scoring overlaps generation) and no collective waits longer than that. Every rollout carries
`meta["weight_version"]` (the server's) and `meta["server"]`; `rollout/staleness.py` judges the lag. SGLang
returns no student entropy: when the method needs it, one forward-only pass of the student over the returned
rollouts computes it (vocab-parallel); otherwise `Rollout.entropy` is None and metrics skip it.

Weight sync (`update_weights(step)`, collective over the whole training world; the weight version is the
optimizer step): rank 0 agrees the live servers with every rank, pauses them (`/pause_generation`,
`/flush_cache`), then either (`distributed`) each PP stage's DP=0/TP=0 rank broadcasts its stage's parameters,
TP-gathered and HF-named, in ~`bucket_mb` buckets over its weights-update group (`weight_sync.py`; the group is
rebuilt when the live servers change), or (`disk`) the stages write one HF directory under `sync_dir` that the
servers load with `/update_weights_from_disk`; then `/continue_generation`. A failed sync is retried once with
the servers still alive, then it is a `RolloutError`. The first `generate` syncs the trainer's current weights
(a fresh start or a resumed run alike), so the servers never sample with anything else. A server that comes
back from the dead re-enters the rotation only with the current weights (reloaded from the version dir with disk
sync; with distributed sync at the next sync).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_camopd.errors import RolloutError
from megatron_camopd.remote.replicas import ReplicaPool
from megatron_camopd.rollout.sampler import EngineOptions, InProcessModel, OnFinish
from megatron_camopd.rollout.sampling import Rollout, SamplingParams
from megatron_camopd.rollout.sglang_protocol import generate_request, max_input_tokens, parse_generation, server_limits
from megatron_camopd.rollout.sglang_sync import ServerWeightSync

log = logging.getLogger("megatron_camopd")
_POLL_S = 0.5  # finished rollouts are shared with the other model-parallel ranks at least this often


class SglangSampler:
    engine = "sglang"
    sync_class: type[ServerWeightSync] = ServerWeightSync  # the servers' weight sync (`rollout/vllm.py` has its own)
    max_input = staticmethod(max_input_tokens)  # the longest prompt a server of a given context length accepts

    @classmethod
    def create(cls, model: InProcessModel, options: EngineOptions) -> SglangSampler:
        """The registry's constructor (engines.py): the servers of `rollout.sglang`, the trainer to sync."""
        return cls(
            options.servers,
            model=model,
            trainer=options.trainer,
            seed=options.seed,
            need_entropy=options.need_entropy,
            model_dir=options.model_dir,
            tokenizer_dir=options.tokenizer_dir,
            stop_requested=options.stop_requested,
        )

    def __init__(
        self,
        servers,
        *,
        model: InProcessModel,
        trainer=None,
        seed: int = 0,
        need_entropy: bool = False,
        model_dir: str | Path | None = None,
        tokenizer_dir: str | Path | None = None,
        stop_requested: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg, self.model, self.trainer = servers, model, trainer
        self.need_entropy = need_entropy
        if servers.urls is None and servers.discovery_file is None:
            raise RolloutError(
                f"rollout.{self.engine}: engine {self.engine} needs urls or discovery_file (the launcher writes it)"
            )
        if trainer is not None and servers.weight_sync == "disk" and servers.sync_dir is None:
            raise RolloutError(
                f"rollout.{self.engine}.sync_dir: the disk weight sync needs a directory the servers can read"
            )
        self.mp_group = ps.get_model_parallel_group()
        self.mp_size = dist.get_world_size(self.mp_group)
        self.mp_leader = dist.get_global_rank(self.mp_group, 0)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.pp_rank, self.pp_size = pp_rank, ps.get_pipeline_model_parallel_world_size()
        self.is_leader = tp_rank == 0 and pp_rank == 0
        is_sender = self.dp_rank == 0 and tp_rank == 0  # this PP stage's weight sender
        self.pool: ReplicaPool | None = None
        self.sync: ServerWeightSync | None = None
        self._limits: dict[str, tuple[int | None, int | None]] = {}  # per server: (context, longest input)
        if self.is_leader or is_sender:
            self.pool = ReplicaPool(
                "rollout servers",
                servers.urls,
                error=RolloutError,
                discovery_file=servers.discovery_file,
                discovery_timeout_s=servers.discovery_timeout_s,
                timeout_s=servers.timeout_s,
                retries=servers.retries,
                max_in_flight=servers.max_in_flight,
                dead_deadline_s=servers.dead_deadline_s,
                seed=seed * 1009 + self.dp_rank,
                revive_check=self._revive_check if trainer is not None else None,
            )
            self._pool.wait_ready(servers.discovery_timeout_s)
        if trainer is not None:
            self.sync = self.sync_class(
                servers,
                self.pool,
                trainer,
                is_sender=is_sender,
                model_dir=model_dir,
                tokenizer_dir=tokenizer_dir,
                stop_requested=stop_requested,
            )

    # ------------------------------------------------------------------ generation

    @property
    def _pool(self) -> ReplicaPool:
        """The replica pool; only the model-parallel leader holds one and talks to the servers."""
        assert self.pool is not None, "rollout servers: only the model-parallel leader holds the replica pool"
        return self.pool

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_finish: OnFinish | None = None
    ) -> list[Rollout]:
        if self.trainer is not None and self.version is None:
            self.update_weights(int(self.trainer.scheduler.num_steps))  # collective: every rank's first call
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        results = self._collect(prompts, params, seeds, on_finish)
        if self.need_entropy:
            self._fill_entropy(results)
        else:
            for r in results:
                r.entropy = None  # SGLang returns no entropy: metrics skip it rather than log zeros
        return results

    # ------------------------------------------------------------------ overlapped pipeline (rollout/pipeline.py)
    def ensure_synced(self) -> None:
        """Collective (main thread): the servers hold the trainer's current weights before any detached call."""
        if self.trainer is not None and self.version is None:
            self.update_weights(int(self.trainer.scheduler.num_steps))

    def generate_detached(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_finish: OnFinish | None = None
    ) -> list[Rollout] | None:
        """`generate` without any collective, for a thread beside the trainer: the model-parallel leader samples
        (`on_finish` as samples finish) and returns the rollouts, other ranks return None at once; `share` then
        gives them to the model-parallel group and `fill_entropy` adds the entropy, on the main thread."""
        if not self.is_leader:
            return None
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        return self._collect(prompts, params, seeds, on_finish, share=False)

    def share(self, rollouts: list[Rollout] | None, error: str | None) -> list[Rollout]:
        """Collective over the model-parallel group: the leader's rollouts (or its error, raised on every rank)."""
        if self.mp_size > 1:
            box = [(rollouts, error)]
            dist.broadcast_object_list(box, src=self.mp_leader, group=self.mp_group)
            rollouts, error = box[0]
        if error is not None:
            raise RolloutError(error)
        assert rollouts is not None, "the leader sends rollouts or an error"
        return rollouts

    def fill_entropy(self, rollouts: list[Rollout]) -> None:
        """Entropy where the method needs it (a forward over the rollouts with the trainer's current weights)."""
        if self.need_entropy:
            self._fill_entropy(rollouts)
        else:
            for r in rollouts:
                r.entropy = None

    # ------------------------------------------------------------------ generation details
    async def _revive_check(self, url: str) -> bool:
        return await self.sync.revive_check(url) if self.sync is not None else True

    def _context_of(self, url: str) -> None:
        """Record a server's limits (`/server_info`: SGLang 0.5.23's `/model_info` has none), once per URL."""
        if url not in self._limits:
            info = (
                self.sync.server_info(url)
                if self.sync is not None
                else self._pool.call(self._pool.get_json(url, "/server_info"))
            )
            self._limits[url] = server_limits(info if isinstance(info, dict) else {})

    def _max_new(self, prompt_len: int, params: SamplingParams) -> int:
        """New tokens every server accepts for a prompt: SGLang 0.5.23 refuses prompt + max_new_tokens > its
        context length and a prompt past its `max_req_input_len` (`sglang_protocol.server_limits`); the trainer's
        context is a hard bound too. 0: the prompt alone fills the context."""
        n = min(params.max_new_tokens, self.model.max_context - prompt_len)
        ctxs = [c for c, _ in self._limits.values() if c is not None]
        inputs = [m for _, m in self._limits.values() if m is not None]
        if self.cfg.context_length:
            ctxs.append(self.cfg.context_length)
            inputs.append(self.max_input(self.cfg.context_length))
        if inputs and prompt_len > min(inputs):
            return 0
        return min(n, min(ctxs) - prompt_len) if ctxs else n

    # the wire protocol of one sample (a served engine on another API overrides these three; rollout/vllm.py)
    path = "/generate"

    def _request(self, prompt: list[int], params: SamplingParams, seed: int, max_new: int, stops: set[int]) -> dict:
        return generate_request(prompt, params, seed, max_new)

    def _parse(self, obj: Any, *, max_new: int, stops: set[int], vocab: int, where: str) -> Any:
        return parse_generation(obj, max_new=max_new, stops=stops, vocab=vocab, where=where)

    def _version_meta(self, g: Any, sent: int | None) -> dict[str, Any]:
        """The rollout's weight version: the one SGLang reports having sampled with."""
        return {"weight_version": g.weight_version}

    async def _one(self, i: int, prompt: list[int], params: SamplingParams, seed: int, max_new: int) -> Rollout:
        sent = self.version  # before the request: never newer than the weights that answer it
        stops = set(params.stop_token_ids) | ({self.model.eos_id} if self.model.eos_id is not None else set())
        body = self._request(prompt, params, seed, max_new, stops)
        where: dict[str, str] = {}

        def check(obj: Any, url: str):
            where["url"] = url
            return self._parse(
                obj,
                max_new=max_new,
                stops=stops,
                vocab=self.model.vocab_size,
                where=f"rollout server {url} (sample {i})",
            )

        g = await self._pool.with_retries(body, check, path=self.path)
        n = len(g.tokens)
        reason = "stop" if g.finish == "stop" else "length" if n >= params.max_new_tokens else "context"
        return Rollout(
            prompt_ids=list(prompt),
            response_ids=g.tokens,
            logprobs=torch.tensor(g.logprobs),
            entropy=torch.full((n,), float("nan")),
            top1=torch.tensor(g.top1, dtype=torch.long),
            finish_reason=reason,
            meta={"engine": self.engine, **self._version_meta(g, sent), "server": where.get("url")},
        )

    def _serve(self, prompts, params, seeds, done: queue.SimpleQueue) -> None:
        """Leader: start every sample; each finished (or failed) rollout lands in `done`."""
        for url in self._pool.live_urls():  # a server the discovery file added since: its limits first
            self._context_of(url)
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            max_new = self._max_new(len(p), params)
            if max_new <= 0:  # the prompt fills the context (as the in-process engines answer it)
                done.put((i, _empty(p, "context", self.engine)))
                continue
            fut = self._pool.submit(self._one(i, p, params, s, max_new))
            fut.add_done_callback(lambda f, i=i, p=p: done.put((i, _result(f, p, self.engine))))

    def _collect(self, prompts, params, seeds, on_finish: OnFinish | None, share: bool = True) -> list[Rollout]:
        n = len(prompts)
        bcast = share and self.mp_size > 1
        results: list[Rollout | None] = [None] * n
        got = 0
        done: queue.SimpleQueue = queue.SimpleQueue()
        if self.is_leader and n:
            self._serve(prompts, params, seeds, done)
        while got < n:
            chunk: list[tuple[int, Rollout]] = []
            if self.is_leader:
                try:
                    chunk.append(done.get(timeout=_POLL_S if bcast else None))
                    while True:
                        chunk.append(done.get_nowait())
                except queue.Empty:
                    pass
            if bcast:
                obj = [chunk]
                dist.broadcast_object_list(obj, src=self.mp_leader, group=self.mp_group)
                chunk = obj[0]
            for i, r in chunk:
                results[i] = r
                if on_finish is not None:
                    on_finish(i, r)
            got += len(chunk)
        done_rollouts = [r for r in results if r is not None]
        assert len(done_rollouts) == n, "every sample finishes exactly once"
        failed = [r.meta["error"] for r in done_rollouts if r.meta.get("error")]
        if n and len(failed) == n:
            raise RolloutError(f"rollout servers: all {n} samples failed; first error: {failed[0]}")
        return done_rollouts

    def _fill_entropy(self, rollouts: list[Rollout]) -> None:
        """Student entropy at each response position: one forward-only pass over the rollouts (every MP rank)."""
        from megatron_camopd.backend.forward import forward_collect
        from megatron_camopd.backend.vocab_parallel import vocab_parallel_entropy
        from megatron_camopd.teachers.inprocess import pad_sequences

        live = [r for r in rollouts if r.response_ids]
        for r in rollouts:
            if not r.response_ids:
                r.entropy = torch.zeros(0)
        if not live:
            return
        m = self.model
        tokens = pad_sequences([r.ids for r in live], m.pad_id)

        def fn(logits_shard: torch.Tensor, mb: dict) -> dict:
            return {"entropy": vocab_parallel_entropy(logits_shard, m.groups.tp, vocab_size=m.vocab_size).float()}

        with torch.no_grad():
            ent = forward_collect(m.chunks, {"tokens": tokens}, fn, m.groups, micro_batch_size=m.micro_batch_size)
        for j, r in enumerate(live):
            p = len(r.prompt_ids)
            r.entropy = ent["entropy"][j, p - 1 : p - 1 + len(r.response_ids)].clone()

    # ------------------------------------------------------------------ weight sync (rollout/sglang_sync.py)
    @property
    def version(self) -> int | None:
        """The trainer's weight version the servers hold (None before the first sync)."""
        return self.sync.version if self.sync is not None else None

    def update_weights(self, step: int) -> dict[str, float]:
        if self.sync is None:
            return {}
        return self.sync.update(step)

    def close(self) -> None:
        try:
            if self.sync is not None:
                self.sync.close()
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None


def _empty(prompt: list[int], reason: str, engine: str, error: str | None = None) -> Rollout:
    meta = {"engine": engine} | ({"error": error} if error else {})
    return Rollout(
        prompt_ids=list(prompt),
        response_ids=[],
        logprobs=torch.zeros(0),
        entropy=torch.zeros(0),
        top1=torch.zeros(0, dtype=torch.long),
        finish_reason=reason,
        meta=meta,
    )


def _result(fut: Any, prompt: list[int], engine: str) -> Rollout:
    """A finished sample's rollout, or an empty one carrying the error (dropped and counted by the step)."""
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 -- kept with the sample, never silently lost
        return _empty(prompt, "abort", engine, f"{type(exc).__name__}: {exc}")
