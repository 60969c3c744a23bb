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

import asyncio
import logging
import queue
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_camopd.errors import RolloutError
from megatron_camopd.replicas import ReplicaPool
from megatron_camopd.rollout import weight_sync as ws
from megatron_camopd.rollout.sampler import InProcessModel, OnFinish
from megatron_camopd.rollout.sampling import Rollout, SamplingParams
from megatron_camopd.rollout.sglang_protocol import generate_request, parse_generation

log = logging.getLogger("megatron_camopd")
_POLL_S = 0.5  # finished rollouts are shared with the other model-parallel ranks at least this often


class SglangSampler:
    engine = "sglang"

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
    ) -> None:
        self.cfg, self.model, self.trainer = servers, model, trainer
        self.need_entropy = need_entropy
        self.model_dir, self.tokenizer_dir = model_dir, tokenizer_dir
        if servers.urls is None and servers.discovery_file is None:
            raise RolloutError("rollout.sglang: engine sglang needs urls or discovery_file (the launcher writes it)")
        if trainer is not None and servers.weight_sync == "disk" and servers.sync_dir is None:
            raise RolloutError("rollout.sglang.sync_dir: the disk weight sync needs a directory the servers can read")
        self.mp_group = ps.get_model_parallel_group()
        self.mp_size = dist.get_world_size(self.mp_group)
        self.mp_leader = dist.get_global_rank(self.mp_group, 0)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.pp_rank, self.pp_size = pp_rank, ps.get_pipeline_model_parallel_world_size()
        self.is_leader = tp_rank == 0 and pp_rank == 0
        self.is_sender = self.dp_rank == 0 and tp_rank == 0  # this PP stage's weight sender
        self.version: int | None = None  # the trainer's weight version the servers hold
        self.sender: ws.DistributedSender | None = None
        self._generation = 0  # weights-update group rebuilds
        self._run_id = uuid.uuid4().hex[:8]
        self._server_info: dict[str, dict] = {}
        self.pool: ReplicaPool | None = None
        if self.is_leader or self.is_sender:
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
    def _max_new(self, prompt_len: int, params: SamplingParams) -> int:
        """SGLang refuses prompt + max_new_tokens >= its context length; the trainer's context is a hard bound."""
        n = min(params.max_new_tokens, self.model.max_context - prompt_len)
        ctx = self.cfg.context_length
        return min(n, ctx - 1 - prompt_len) if ctx else n

    async def _one(self, i: int, prompt: list[int], params: SamplingParams, seed: int, max_new: int) -> Rollout:
        stops = set(params.stop_token_ids) | ({self.model.eos_id} if self.model.eos_id is not None else set())
        body = generate_request(prompt, params, seed, max_new)
        where: dict[str, str] = {}

        def check(obj: Any, url: str):
            where["url"] = url
            return parse_generation(
                obj,
                max_new=max_new,
                stops=stops,
                vocab=self.model.vocab_size,
                where=f"rollout server {url} (sample {i})",
            )

        g = await self._pool.with_retries(body, check)
        n = len(g.tokens)
        reason = "stop" if g.finish == "stop" else "length" if n >= params.max_new_tokens else "context"
        return Rollout(
            prompt_ids=list(prompt),
            response_ids=g.tokens,
            logprobs=torch.tensor(g.logprobs),
            entropy=torch.full((n,), float("nan")),
            top1=torch.tensor(g.top1, dtype=torch.long),
            finish_reason=reason,
            meta={"engine": self.engine, "weight_version": g.weight_version, "server": where.get("url")},
        )

    def _serve(self, prompts, params, seeds, done: queue.SimpleQueue) -> None:
        """Leader: start every sample; each finished (or failed) rollout lands in `done`."""
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

    # ------------------------------------------------------------------ weight sync
    async def _revive_check(self, url: str) -> bool:
        """A server back from the dead serves again only with the current weights."""
        if self.version is None:
            return True
        info = await self._pool.get_json(url, "/get_weight_version")
        if isinstance(info, dict) and str(info.get("weight_version")) == str(self.version):
            return True
        final = ws.version_dir(self.cfg.sync_dir, self.version) if self.cfg.weight_sync == "disk" else None
        if final is None or not final.is_dir():
            log.warning(
                "rollout server %s is back with weight_version %s (trainer: %s): out of the rotation until "
                "the next weight sync",
                url,
                info,
                self.version,
            )
            return False
        ans = await self._pool.request(
            self._pool.replicas[url],
            "/update_weights_from_disk",
            {"model_path": str(final), "weight_version": str(self.version), "flush_cache": True},
        )
        return isinstance(ans, dict) and bool(ans.get("success"))

    def _members(self) -> tuple[list[str], dict[str, int]]:
        """Rank 0: the servers answering /health (waiting up to dead_deadline_s for one), and their workers."""
        pool = self._pool

        async def probe() -> list[str]:
            urls = pool.urls
            oks = await asyncio.gather(*(pool.health_ok(u) for u in urls))
            return [u for u, ok in zip(urls, oks) if ok]

        deadline = time.monotonic() + self.cfg.dead_deadline_s
        while not (members := pool.call(probe())):
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"rollout servers: none of {pool.urls} answered /health for "
                    f"{self.cfg.dead_deadline_s:.0f}s (rollout.sglang.dead_deadline_s); weights not synced"
                )
            time.sleep(0.5)
        workers = {}
        for u in members:
            if u not in self._server_info:
                info = pool.call(pool.get_json(u, "/get_server_info"))
                self._server_info[u] = info if isinstance(info, dict) else {}
            info = self._server_info[u]
            if (
                self.cfg.weight_sync == "distributed"
                and max(int(info.get("dp_size") or 1), int(info.get("pp_size") or 1)) > 1
            ):
                raise RolloutError(
                    f"rollout.sglang.weight_sync: distributed sync needs servers with dp_size = pp_size"
                    f" = 1 (SGLang joins the update group as rank_offset + tp_rank); {u} has dp_size "
                    f"{info.get('dp_size')}, pp_size {info.get('pp_size')}: use weight_sync: disk"
                )
            workers[u] = int(info.get("tp_size") or 1)
        return members, workers

    def _broadcast_world(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _control(self, members: list[str], path: str) -> None:
        """Rank 0: one control request to every member (pause, flush, continue)."""
        pool = self._pool
        futures = [pool.submit(pool.request(pool.replicas[u], path, None)) for u in members]
        for u, f in zip(members, futures):
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001 -- a missed flush is not fatal (updates flush too); pause is
                if path == "/pause_generation":
                    raise RolloutError(f"rollout server {u}: {path} failed: {exc}") from exc
                log.warning("rollout server %s: %s failed: %s", u, path, exc)

    def _plan(self) -> tuple:
        """Rank 0: (members, workers, error, fatal) of this sync attempt; the servers are paused on success."""
        try:
            members, workers = self._members()
        except RolloutError as exc:
            return None, None, str(exc), True
        try:
            self._control(members, "/pause_generation")
            self._control(members, "/flush_cache")
        except RolloutError as exc:
            return None, None, str(exc), False
        return members, workers, None, False

    def update_weights(self, step: int) -> dict[str, float]:
        if self.trainer is None:
            return {}
        t0, last = time.time(), ""
        for tries in (1, 2):
            members, workers, error, fatal = self._broadcast_world(self._plan() if dist.get_rank() == 0 else None)
            if fatal:
                raise RolloutError(error)
            if error is None:
                nbytes, err = self._sync_stages(members, workers, step)
                flags = torch.tensor([0.0 if err else 1.0, float(nbytes)], dtype=torch.float64, device=_dev())
                dist.all_reduce(flags[:1], op=dist.ReduceOp.MIN)
                dist.all_reduce(flags[1:], op=dist.ReduceOp.SUM)
                errors: list = [None] * dist.get_world_size()
                dist.all_gather_object(errors, err)
                if flags[0] > 0:
                    return self._synced(members, step, time.time() - t0, flags[1].item(), tries)
                error = next(e for e in errors if e)
            last = error
            log.warning("weight sync of step %d failed (try %d): %s", step, tries, error)
            self._reset_groups()
        raise RolloutError(f"rollout servers: weight sync of step {step} failed twice; last error: {last}")

    def _synced(self, members: list[str], step: int, dt: float, nbytes: float, tries: int) -> dict[str, float]:
        if dist.get_rank() == 0:
            self._control(members, "/continue_generation")
            for u in members:  # they hold the current weights: back in the rotation
                self._pool.replicas[u].alive = True
        self.version = step
        log.info(
            "weights of step %d synced to %d rollout servers in %.2fs (%s, %.1f MB)",
            step,
            len(members),
            dt,
            self.cfg.weight_sync,
            nbytes / 2**20,
        )
        return {
            "weight_sync_s": dt,
            "weight_sync_bytes": nbytes,
            "weight_sync_servers": len(members),
            "weight_sync_tries": tries,
        }

    def _reset_groups(self) -> None:
        if self.sender is not None:
            self.sender.close(self.pool)
            self.sender = None

    def _sync_stages(self, members: list[str], workers: dict[str, int], step: int) -> tuple[int, str | None]:
        """This rank's part of one sync: (bytes it sent or wrote, its error or None). The PP stages go one after
        the other (a server takes one update at a time: concurrent stages could deadlock across servers). Errors
        are returned, never raised before the collectives end, so no rank is left waiting."""
        disk = self.cfg.weight_sync == "disk"
        tmp = Path(self.cfg.sync_dir) / f".tmp_step_{step:08d}" if disk and self.cfg.sync_dir else None
        if tmp is not None and dist.get_rank() == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        nbytes, err = 0, None
        for stage in range(self.pp_size):
            dist.barrier()
            if stage == self.pp_rank and self.dp_rank == 0:
                nbytes, err = self._sync_stage(members, workers, step, tmp)
        dist.barrier()
        if tmp is not None and dist.get_rank() == 0 and err is None:
            err = self._publish(tmp, members, step)
        return nbytes, err

    def _sync_stage(
        self, members: list[str], workers: dict[str, int], step: int, tmp: Path | None
    ) -> tuple[int, str | None]:
        """DP=0 ranks of this stage walk its parameters (TP collectives); the stage's sender sends or writes."""
        cfg, err, nbytes, sender = self.cfg, None, 0, self.is_sender
        if sender and tmp is None:
            try:
                if self.sender is None or self.sender.members != members:
                    self._reset_groups()
                    self._generation += 1
                    backend = "nccl" if torch.cuda.is_available() else "gloo"
                    name = f"camopd-{self._run_id}-pp{self.pp_rank}-{self._generation}"  # unique on the servers
                    self.sender = ws.DistributedSender(name, backend, min(cfg.timeout_s, 600.0))
                    self.sender.connect(self.pool, members, workers)
            except Exception as exc:  # noqa: BLE001 -- reported through the agreement in update_weights
                err = f"{type(exc).__name__}: {exc}"
        t = self.trainer
        groups = ws.stage_hf_groups(t.models(), t.arch, ps.get_tensor_model_parallel_group(), self.pp_rank == 0)
        if tmp is not None:
            stage = {n: x for g in groups for n, x in g}
            if sender:
                try:
                    nbytes += ws.write_stage_shard(tmp, self.pp_rank, self.pp_size, stage)
                except Exception as exc:  # noqa: BLE001
                    err = f"{type(exc).__name__}: {exc}"
            return nbytes, err
        for bucket in ws.buckets(groups, cfg.bucket_mb):
            if sender and err is None:
                try:
                    assert self.sender is not None, "a distributed sync has a sender"
                    nbytes += self.sender.send(self.pool, bucket, step)
                except Exception as exc:  # noqa: BLE001
                    err = f"{type(exc).__name__}: {exc}"
        return nbytes, err

    def _publish(self, tmp: Path, members: list[str], step: int) -> str | None:
        """Rank 0, disk sync: finish the version dir and have every member load it."""
        import json

        final = ws.version_dir(self.cfg.sync_dir, step)
        try:
            hf_config = json.loads((Path(self.model_dir) / "config.json").read_text()) if self.model_dir else {}
            dtype = next(self.trainer.models()[0].parameters()).dtype
            ws.finish_version_dir(
                tmp, final, self.pp_size, hf_config, str(self.tokenizer_dir) if self.tokenizer_dir else None, dtype
            )
            pool = self._pool
            body = {"model_path": str(final.resolve()), "weight_version": str(step), "flush_cache": True}
            futures = {
                u: pool.submit(pool.request(pool.replicas[u], "/update_weights_from_disk", body)) for u in members
            }
            ws._check({u: ws._answer(f) for u, f in futures.items()}, "/update_weights_from_disk")
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        ws.remove_other_versions(self.cfg.sync_dir, keep=final)
        return None

    def close(self) -> None:
        try:
            self._reset_groups()
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None


def _dev() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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
