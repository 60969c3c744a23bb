"""The weight sync of the `sglang` rollout engine: after every optimizer step the servers take the trainer's
weights, in the order SGLang 0.5.23 expects (read in its `entrypoints/http_server.py` and
`managers/scheduler_components/weight_updater.py`), and never stay paused when something fails.

One attempt (`update`, collective over the whole training world; the weight version is the optimizer step):

    rank 0   the live servers (`/health`, before anything is paused), POST /pause_generation {}, GET /flush_cache,
             POST /begin_weight_update {} (distributed only: updates outside that session are refused)
    senders  each PP stage's DP=0/TP=0 rank in turn: its buckets over the weights-update group (queued
             broadcasts; only the last bucket of the last stage flushes the cache and sets `weight_version`) --
             or, with `weight_sync: disk`, its safetensors shard, then rank 0 publishes the version directory and
             every server loads it with /update_weights_from_disk {model_path, weight_version, flush_cache}
    rank 0   POST /end_weight_update {}, POST /continue_generation {}, and every server's `/model_info` must
             report the new version

On any failure after the pause rank 0 still ends the session and continues every server (best effort), so a
failed sync leaves no server paused; the attempt is retried once, then it is a `RolloutError`. Nothing probes a
paused server's `/health` (SGLang's generating health check waits for the pause and answers 503 after 20 s);
a paused server is known alive by its `/model_info`. Every wait of an attempt is bounded by its own deadline
(`rollout.sglang.sync_timeout_s`: the rendezvous store, the group build, each broadcast, each HTTP answer) and
polls the trainer's preemption flag: a signal ends the attempt within a fraction of a second, the servers are
continued, the step's row says `weight_sync_preempted`, and the resumed run syncs its weights first thing.

A server back from the dead serves again only with the current weights: its `/model_info` version must be the
trainer's, else (disk sync) it reloads the current version directory, or (distributed) it waits for the next
sync, which includes every server that answers `/health`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_camopd.errors import RolloutError
from megatron_camopd.remote.replicas import ReplicaPool
from megatron_camopd.rollout import weight_sync as ws
from megatron_camopd.rollout.sglang_protocol import SGLANG_VERSION

log = logging.getLogger("megatron_camopd")


@dataclass
class _Plan:
    """What rank 0 decided for one attempt, broadcast to every rank."""

    members: list[str]
    workers: dict[str, int]  # tp workers per server (each joins the weights-update group)
    error: str | None = None
    fatal: bool = False  # no server to sync at all: no retry
    preempted: bool = False  # a preemption signal ended the attempt


class ServerWeightSync:
    """The weight sync of one `SglangSampler` (see the module docstring). `pool` is held by rank 0 and the
    senders; `stop_requested` is the trainer's preemption flag."""

    section = "rollout.sglang"  # the spec section of the servers (named in errors)

    def __init__(
        self,
        cfg: Any,
        pool: ReplicaPool | None,
        trainer: Any,
        *,
        is_sender: bool,
        model_dir: str | Path | None,
        tokenizer_dir: str | Path | None,
        stop_requested: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg, self.pool, self.trainer = cfg, pool, trainer
        self.is_sender = is_sender
        self.pp_rank, self.pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.model_dir, self.tokenizer_dir = model_dir, tokenizer_dir
        self.stop_requested = stop_requested or (lambda: False)
        self.version: int | None = None  # the trainer's weight version the servers hold
        self.sender: ws.DistributedSender | None = None
        self.seeded: bool | None = None  # whether the servers honour sampling_seed (deterministic inference)
        self._generation = 0  # weights-update group rebuilds
        self._run_id = uuid.uuid4().hex[:8]
        self._server_info: dict[str, dict] = {}
        self._sync_epoch = 0  # odd while a sync runs: a server revived meanwhile waits for the next probe

    @property
    def _pool(self) -> ReplicaPool:
        assert self.pool is not None, "rollout servers: only rank 0 and the stage senders hold the replica pool"
        return self.pool

    # ------------------------------------------------------------------ one sync
    def update(self, step: int) -> dict[str, float]:
        self._sync_epoch += 1
        try:
            return self._update(step)
        finally:
            self._sync_epoch += 1

    def _update(self, step: int) -> dict[str, float]:
        t0, last = time.time(), ""
        rank0 = dist.get_rank() == 0
        for tries in (1, 2):
            deadline = ws.Deadline(self.cfg.sync_timeout_s, self.stop_requested, field=f"{self.section}.sync_timeout_s")
            plan: _Plan = _broadcast_world(self._plan(deadline) if rank0 else None)
            if plan.fatal:
                raise RolloutError(plan.error)
            nbytes, error, preempted = 0.0, plan.error, plan.preempted
            if error is None:
                sent, mine = self._sync_stages(plan, step, deadline)
                outcome = (sent, None if mine is None else f"{type(mine).__name__}: {mine}", _preempted(mine))
                outcomes: list = [None] * dist.get_world_size()
                dist.all_gather_object(outcomes, outcome)
                nbytes = float(sum(o[0] for o in outcomes))
                failed = [o for o in outcomes if o[1] is not None]
                error = failed[0][1] if failed else None
                preempted = any(o[2] for o in failed)
                if rank0:
                    error = self._finish(plan, step, deadline, error)
                error, preempted = _broadcast_world((error, preempted or self.stop_requested()))
            if error is None:
                return self._synced(plan.members, step, time.time() - t0, nbytes, tries)
            last = error
            self._reset_groups()
            if preempted:
                log.warning("weight sync of step %d stopped by a preemption signal: %s", step, error)
                self.version = None  # the next generate (a resumed run's first) syncs again
                return {"weight_sync_preempted": 1.0, "weight_sync_s": time.time() - t0}
            log.warning("weight sync of step %d failed (try %d): %s", step, tries, error)
        raise RolloutError(f"rollout servers: weight sync of step {step} failed twice; last error: {last}")

    def _plan(self, deadline: ws.Deadline) -> _Plan:
        """Rank 0: the members of this attempt, paused (and inside a weight-update session when distributed)."""
        try:
            members, workers = self._members(deadline)
        except RolloutError as exc:
            return _Plan([], {}, str(exc), fatal=not isinstance(exc, ws.SyncAborted), preempted=_preempted(exc))
        try:
            self._pause(members, deadline)
        except RolloutError as exc:
            self._release(members)
            return _Plan([], {}, str(exc), preempted=_preempted(exc))
        return _Plan(members, workers)

    def _finish(self, plan: _Plan, step: int, deadline: ws.Deadline, error: str | None) -> str | None:
        """Rank 0: end the session and continue every member whatever happened; check the versions on success."""
        if error is not None:
            self._release(plan.members)
            return error
        try:
            self._resume(plan.members, deadline)
            self._check_versions(plan.members, step, deadline)
        except RolloutError as exc:
            self._release(plan.members)
            return str(exc)
        return None

    def _pause(self, members: list[str], deadline: ws.Deadline) -> None:
        """Rank 0: stop the members generating (and open the weight-update session of a distributed sync)."""
        self._control(members, "/pause_generation", deadline)
        self._control(members, "/flush_cache", deadline, method="GET", required=False)
        if self.cfg.weight_sync == "distributed":
            self._control(members, "/begin_weight_update", deadline)

    def _resume(self, members: list[str], deadline: ws.Deadline) -> None:
        """Rank 0, after a sync that succeeded: close the session and let the members generate again."""
        if self.cfg.weight_sync == "distributed":
            self._control(members, "/end_weight_update", deadline)
        self._control(members, "/continue_generation", deadline)

    def _release(self, members: list[str]) -> None:
        """Best effort on a failure path: close the weight-update session (if one is open) and continue generation
        on every member, each with its own short deadline (the attempt's may be spent)."""
        if not members:
            return
        grace = ws.Deadline(min(60.0, self.cfg.timeout_s))
        if self.cfg.weight_sync == "distributed":
            self._control(members, "/end_weight_update", grace, required=False, quiet=True)
        self._control(members, "/continue_generation", grace, required=False)

    def _check_versions(self, members: list[str], step: int, deadline: ws.Deadline) -> None:
        pool = self._pool
        futures = {u: pool.submit(pool.get_json(u, "/model_info")) for u in members}
        for u, f in futures.items():
            info = deadline.result(f, "reading the servers' weight versions")
            got = info.get("weight_version") if isinstance(info, dict) else info
            if str(got) != str(step):
                raise RolloutError(
                    f"rollout server {u}: /model_info reports weight_version {got!r} after the sync of {step}"
                )

    def _synced(self, members: list[str], step: int, dt: float, nbytes: float, tries: int) -> dict[str, float]:
        if dist.get_rank() == 0:
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

    # ------------------------------------------------------------------ rank 0: members and control requests
    def _members(self, deadline: ws.Deadline) -> tuple[list[str], dict[str, int]]:
        """Rank 0: the servers answering /health (waiting up to dead_deadline_s for one), and their workers. The
        servers are not paused here: every sync and every failure path continues them."""
        pool = self._pool

        async def probe() -> list[str]:
            urls = pool.urls
            oks = await asyncio.gather(*(pool.health_ok(u) for u in urls))
            return [u for u, ok in zip(urls, oks) if ok]

        give_up = time.monotonic() + self.cfg.dead_deadline_s
        while not (members := pool.call(probe())):
            if time.monotonic() > give_up:
                raise RolloutError(
                    f"rollout servers: none of {pool.urls} answered /health for "
                    f"{self.cfg.dead_deadline_s:.0f}s ({self.section}.dead_deadline_s); weights not synced"
                )
            deadline.check("waiting for a live rollout server")
            time.sleep(0.5)
        workers = {}
        for u in members:
            info = self.server_info(u)
            if (
                self.cfg.weight_sync == "distributed"
                and max(int(info.get("dp_size") or 1), int(info.get("pp_size") or 1)) > 1
            ):
                raise RolloutError(
                    f"rollout.sglang.weight_sync: distributed sync needs servers with dp_size = pp_size"
                    f" = 1 (SGLang joins the update group as rank_offset + tp_rank); {u} has dp_size "
                    f"{info.get('dp_size')}, pp_size {info.get('pp_size')}: run several servers per node "
                    "(rollout.sglang.servers_per_node) or use weight_sync: disk"
                )
            workers[u] = int(info.get("tp_size") or 1)
        return members, workers

    def server_info(self, url: str) -> dict:
        """`/server_info` of a server (once per URL): its parallelism, version and whether it honours seeds."""
        if url not in self._server_info:
            info = self._pool.call(self._pool.get_json(url, "/server_info"))
            info = info if isinstance(info, dict) else {}
            self._server_info[url] = info
            version = info.get("sglang_contract", info.get("version"))
            if version != SGLANG_VERSION:
                log.warning(
                    "rollout server %s reports SGLang %s; this project is tested with %s", url, version, SGLANG_VERSION
                )
            seeded = bool(info.get("enable_deterministic_inference"))
            if not seeded and self.seeded is not False:
                log.warning(
                    "rollout server %s runs without --enable-deterministic-inference: SGLang ignores sampling_seed "
                    "there, so served rollouts are not reproducible across runs or a resume "
                    "(rollout.sglang.deterministic_inference; SGLang offers it only with GPU attention backends)",
                    url,
                )
            self.seeded = seeded if self.seeded is None else self.seeded and seeded
        return self._server_info[url]

    def _control(
        self,
        members: list[str],
        path: str,
        deadline: ws.Deadline,
        *,
        method: str = "POST",
        required: bool = True,
        quiet: bool = False,
    ) -> None:
        """Rank 0: one control request to every member (a JSON body `{}`: SGLang refuses a POST without one)."""
        pool = self._pool
        body: dict[str, Any] | None = {} if method == "POST" else None
        timeout = max(deadline.left(), 1.0)
        futures = {
            u: pool.submit(pool.request(pool.replicas[u], path, body, method=method, timeout_s=timeout))
            for u in members
        }
        for u, f in futures.items():
            answer = deadline.result(f, f"waiting for {path}") if required else ws.Deadline(timeout).result(f, path)
            failed = isinstance(answer, Exception) or (isinstance(answer, dict) and answer.get("success") is False)
            if not failed:
                continue
            if required:
                raise RolloutError(f"rollout server {u}: {path} failed: {answer}")
            if not quiet:
                log.warning("rollout server %s: %s failed: %s", u, path, answer)

    # ------------------------------------------------------------------ every rank: the stages' weights
    def _reset_groups(self) -> None:
        if self.sender is not None:
            self.sender.close(self.pool)
            self.sender = None

    def close(self) -> None:
        self._reset_groups()

    def _sync_stages(self, plan: _Plan, step: int, deadline: ws.Deadline) -> tuple[int, Exception | None]:
        """This rank's part of one attempt: (bytes it sent or wrote, its error or None). The PP stages go one
        after the other (a server takes one update at a time). Errors are returned, never raised before the
        collectives end, so no rank is left waiting."""
        disk = self.cfg.weight_sync == "disk"
        tmp = Path(self.cfg.sync_dir) / f".tmp_step_{step:08d}" if disk and self.cfg.sync_dir else None
        if tmp is not None and dist.get_rank() == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        nbytes, err = 0, None
        for stage in range(self.pp_size):
            dist.barrier()
            if stage == self.pp_rank and self.dp_rank == 0:
                nbytes, err = self._sync_stage(plan, step, tmp, deadline)
        dist.barrier()
        if tmp is not None and dist.get_rank() == 0 and err is None:
            err = self._publish(tmp, plan.members, step, deadline)
        return nbytes, err

    def _sync_stage(
        self, plan: _Plan, step: int, tmp: Path | None, deadline: ws.Deadline
    ) -> tuple[int, Exception | None]:
        """DP=0 ranks of this stage walk its parameters (TP collectives); the stage's sender sends or writes."""
        err: Exception | None = None
        nbytes, sender = 0, self.is_sender
        if sender and tmp is None:
            try:
                if self.sender is None or self.sender.members != plan.members:
                    self._reset_groups()
                    self._generation += 1
                    backend = "nccl" if torch.cuda.is_available() else "gloo"
                    name = f"camopd-{self._run_id}-pp{self.pp_rank}-{self._generation}"  # unique on the servers
                    self.sender = ws.DistributedSender(name, backend)
                    self.sender.connect(self.pool, plan.members, plan.workers, deadline)
            except Exception as exc:  # noqa: BLE001 -- reported through the agreement in update
                err = exc
        t = self.trainer
        groups = ws.stage_hf_groups(t.models(), t.arch, ps.get_tensor_model_parallel_group(), self.pp_rank == 0)
        if tmp is not None:
            stage = {n: x for g in groups for n, x in g}
            if sender:
                try:
                    nbytes += ws.write_stage_shard(tmp, self.pp_rank, self.pp_size, stage)
                except Exception as exc:  # noqa: BLE001
                    err = exc
            return nbytes, err
        last_stage = self.pp_rank == self.pp_size - 1
        pending: list[tuple[str, torch.Tensor]] | None = None
        for bucket in ws.buckets(groups, self.cfg.bucket_mb):  # one bucket late: the last one is known as such
            if pending is not None and sender and err is None:
                err, nbytes = self._send(pending, step, False, deadline, nbytes)
            pending = bucket
        if pending is not None and sender and err is None:
            err, nbytes = self._send(pending, step, last_stage, deadline, nbytes)
        return nbytes, err

    def _send(self, bucket, step: int, last: bool, deadline: ws.Deadline, nbytes: int) -> tuple[Exception | None, int]:
        try:
            assert self.sender is not None, "a distributed sync has a sender"
            return None, nbytes + self.sender.send(self.pool, bucket, step, last, deadline)
        except Exception as exc:  # noqa: BLE001
            return exc, nbytes

    def _publish(self, tmp: Path, members: list[str], step: int, deadline: ws.Deadline) -> Exception | None:
        """Rank 0, disk sync: finish the version dir and have every member load it."""
        final = ws.version_dir(self.cfg.sync_dir, step)
        try:
            hf_config = json.loads((Path(self.model_dir) / "config.json").read_text()) if self.model_dir else {}
            dtype = next(self.trainer.models()[0].parameters()).dtype
            ws.finish_version_dir(
                tmp, final, self.pp_size, hf_config, str(self.tokenizer_dir) if self.tokenizer_dir else None, dtype
            )
            self._load(members, final, step, deadline)
        except Exception as exc:  # noqa: BLE001
            return exc
        ws.remove_other_versions(self.cfg.sync_dir, keep=final)
        return None

    def _load(self, members: list[str], final: Path, step: int, deadline: ws.Deadline) -> None:
        """Rank 0, disk sync: every member loads the version directory `final` (its weight version: `step`)."""
        pool = self._pool
        body = {"model_path": str(final.resolve()), "weight_version": str(step), "flush_cache": True}
        futures = {
            u: pool.submit(
                pool.request(pool.replicas[u], "/update_weights_from_disk", body, timeout_s=max(deadline.left(), 1.0))
            )
            for u in members
        }
        ws.check_answers(
            {u: deadline.result(f, "loading the new weights from disk") for u, f in futures.items()},
            "/update_weights_from_disk",
        )

    # ------------------------------------------------------------------ revival (the pool's probe loop)
    async def revive_check(self, url: str) -> bool:
        """A server back from the dead serves again only with the current weights: not while a sync runs, and
        only if no sync finished while it was loading them (else the next probe tries again)."""
        epoch, version = self._sync_epoch, self.version
        if epoch % 2:
            return False
        ok = await self._revive_with(url, version)
        return ok and self._sync_epoch == epoch and self.version == version

    async def _revive_with(self, url: str, version: int | None) -> bool:
        if version is None:
            return True
        pool = self._pool
        info = await pool.get_json(url, "/model_info")
        if isinstance(info, dict) and str(info.get("weight_version")) == str(version):
            return True
        final = ws.version_dir(self.cfg.sync_dir, version) if self.cfg.weight_sync == "disk" else None
        if final is None or not final.is_dir():
            log.warning(
                "rollout server %s is back with weight_version %s (trainer: %s): out of the rotation until "
                "the next weight sync",
                url,
                info.get("weight_version") if isinstance(info, dict) else info,
                version,
            )
            return False
        ans = await pool.request(
            pool.replicas[url],
            "/update_weights_from_disk",
            {"model_path": str(final.resolve()), "weight_version": str(version), "flush_cache": True},
        )
        return isinstance(ans, dict) and bool(ans.get("success"))


def _preempted(exc: BaseException | None) -> bool:
    return isinstance(exc, ws.SyncAborted) and exc.preempted


def _broadcast_world(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
