"""Trainer side of the weight sync to SGLang rollout servers: this pipeline stage's parameters as HF tensors, in
buckets, sent over a weights-update process group or written as a HF directory (slime's design), every wait
bounded by the sync's own deadline.

`stage_hf_groups` gathers each parameter of this rank's chunks over TP (collective over the TP group of the
DP=0 replica) and maps it to HF names with `backend/hf_mapping.py`; `buckets` cuts the stream into ~`bucket_mb`
pieces without splitting one Megatron tensor's HF parts (q/k/v, gate/up). The sender of each PP stage is its
DP=0/TP=0 rank.

`init_custom_process_group` is SGLang 0.5.23's recipe (`srt/utils/common.py`), which both ends of a
weights-update group must follow: a TCP rendezvous at the trainer's address, the store prefixed with the
*group name*. `DistributedSender` (weight_sync: distributed) builds one with every server worker (rank_offset =
1 + the workers of the servers before it, so several servers per node each take their own ranks) on a store of
its own (a fresh port; gloo on CPU, nccl on GPU), so it never touches the training world; per bucket one `POST
/update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache, weight_version}` to every server
while the sender queues one broadcast per tensor (`async_op`) and waits for them together; only the sync's last
bucket carries `flush_cache` and `weight_version`, so a sync that fails half way never labels half-loaded
weights with the new version. (The session around the buckets -- pause, begin, end, continue -- is
`rollout/sglang_sync.py`'s.) `Deadline` bounds every wait of one sync attempt (the store's, the group's, each
broadcast's, each HTTP answer's) and ends it early when a preemption signal arrives.
`write_stage_shard` / `finish_version_dir` (weight_sync: disk): each stage writes its safetensors shard into a
temporary version directory, rank 0 adds the index and config and renames it into place atomically; the servers
then `POST /update_weights_from_disk`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_camopd.backend.hf_mapping import chunk_key_map, megatron_to_hf_state_dict, tp_unshard
from megatron_camopd.errors import RolloutError

_EMBED = "embedding.word_embeddings.weight"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def stage_hf_groups(
    chunks: list, arch: Any, tp_group: Any, first_stage: bool
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Per Megatron tensor of this stage: its HF tensors (full, TP-gathered, on the parameter's device). Collective
    over `tp_group`. A tied output layer on a later stage is the first stage's embedding: not sent twice."""
    seen: set[str] = set()
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    for chunk in chunks:
        params = chunk.state_dict(keep_vars=True)
        for key, full_key in chunk_key_map(chunk, arch).items():
            if full_key in seen or (
                full_key == _EMBED and arch.tie_word_embeddings and not first_stage and "output_layer" in key
            ):
                continue
            seen.add(full_key)
            local = params[key].detach().contiguous()
            if tp > 1:
                shards = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(shards, local, group=tp_group)
                full = tp_unshard(full_key, shards)
            else:
                full = local
            hf = megatron_to_hf_state_dict({full_key: full}, arch)
            yield [
                (n, t.contiguous()) for n, t in hf.items() if not (n == "lm_head.weight" and arch.tie_word_embeddings)
            ]


def buckets(
    groups: Iterator[list[tuple[str, torch.Tensor]]], bucket_mb: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of about `bucket_mb` MiB (a group larger than that is a bucket of its own)."""
    limit, size = bucket_mb * 2**20, 0
    cur: list[tuple[str, torch.Tensor]] = []
    for group in groups:
        nbytes = sum(t.numel() * t.element_size() for _, t in group)
        if cur and size + nbytes > limit:
            yield cur
            cur, size = [], 0
        cur.extend(group)
        size += nbytes
    if cur:
        yield cur


def reachable_address(urls: list[str]) -> str:
    """The address of this host that the servers can connect back to (loopback when they are all local)."""
    hosts = [urllib.parse.urlparse(u).hostname or "" for u in urls]
    if all(h in ("127.0.0.1", "localhost", "::1") for h in hosts):
        return "127.0.0.1"
    port = urllib.parse.urlparse(urls[0]).port or 80
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent: only the route is chosen
        s.connect((hosts[0], port))
        return s.getsockname()[0]


def init_custom_process_group(
    backend: str, init_method: str, world_size: int, rank: int, group_name: str, timeout_s: float, store: Any = None
) -> Any:
    """A process group outside the default world, built as SGLang 0.5.23 builds its end of a weights-update group
    (`init_custom_process_group` in `srt/utils/common.py`): rendezvous at `init_method` (tcp://host:port; rank 0
    hosts the store unless `store` is given), the store prefixed with `group_name`."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,  # type: ignore[arg-type]  # a str at runtime; the private helper's stub wants its NewType
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class SyncAborted(RolloutError):
    """A weight sync attempt ran out of its deadline, or stopped early for a preemption signal."""

    def __init__(self, message: str, *, preempted: bool) -> None:
        super().__init__(message)
        self.preempted = preempted


class Deadline:
    """The time one sync attempt may take (`rollout.sglang.sync_timeout_s`), and the preemption flag it honours:
    every wait of the attempt polls it, so a signal is acted on within `poll_s` instead of after a timeout."""

    def __init__(
        self,
        seconds: float,
        stop_requested: Callable[[], bool] | None = None,
        poll_s: float = 0.05,
        field: str = "rollout.sglang.sync_timeout_s",
    ):
        self.seconds, self.end, self.field = seconds, time.monotonic() + seconds, field
        self.stop_requested = stop_requested or (lambda: False)
        self.poll_s = poll_s

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def check(self, what: str) -> None:
        """SyncAborted when the attempt must stop now (a preemption signal, or its time is up)."""
        if self.stop_requested():
            raise SyncAborted(f"weight sync stopped while {what}: preemption signal", preempted=True)
        if time.monotonic() >= self.end:
            raise SyncAborted(
                f"weight sync timed out after {self.seconds:.0f}s ({self.field}) while {what}",
                preempted=False,
            )

    def until(self, done: Callable[[], bool], what: str) -> None:
        """Poll `done()` until it holds; SyncAborted on a signal or at the deadline."""
        while not done():
            self.check(what)
            time.sleep(self.poll_s)

    def result(self, fut: Any, what: str) -> Any:
        """The answer of a pool future (or the exception it raised), waiting at most until the deadline."""
        self.until(fut.done, what)
        return _answer(fut)


class DistributedSender:
    """One weights-update group between this stage's sender and the servers' workers (see the module docstring)."""

    def __init__(self, name: str, backend: str) -> None:
        self.name, self.backend = name, backend
        self.pg: Any = None
        self.members: list[str] = []

    def connect(self, pool: Any, members: list[str], ranks_per_server: dict[str, int], deadline: Deadline) -> None:
        """Build the group with the servers `members` (each joins through `/init_weights_update_group`)."""
        address = reachable_address(members)
        timeout_s = max(deadline.left(), 1.0)
        store = dist.TCPStore(address, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
        offsets, world = {}, 1
        for url in members:
            offsets[url] = world
            world += ranks_per_server[url]
        futures = {
            url: pool.submit(
                pool.request(
                    pool.replicas[url],
                    "/init_weights_update_group",
                    {
                        "master_address": address,
                        "master_port": store.port,
                        "rank_offset": offsets[url],
                        "world_size": world,
                        "group_name": self.name,
                        "backend": self.backend,
                    },
                    timeout_s=timeout_s,
                )
            )
            for url in members
        }
        # the rendezvous blocks until every server joined: build it in a thread, so that a server refusing to
        # join (its answer comes back first), a signal or the deadline end the wait now instead of after the
        # store's timeout (the daemon thread then times out on its own)
        made: dict[str, Any] = {}

        def build() -> None:
            try:
                made["pg"] = init_custom_process_group(
                    self.backend, f"tcp://{address}:{store.port}", world, 0, self.name, timeout_s, store=store
                )
            except Exception as exc:  # noqa: BLE001 -- re-raised below
                made["error"] = exc.with_traceback(None)  # its frames would keep the store (and its port) alive

        thread = threading.Thread(target=build, daemon=True, name="weights-group")
        thread.start()

        def finished() -> bool:
            refused = {u: a for u, f in futures.items() if f.done() and _failed(a := _answer(f))}
            if refused:
                _check(refused, "/init_weights_update_group")
            return not thread.is_alive()

        try:
            deadline.until(finished, f"building the weights-update group {self.name} with {len(members)} server(s)")
        except BaseException:
            # the traceback keeps this frame: drop the store here (and the build's error, whose traceback holds it
            # too), so it goes -- and the servers' rendezvous fails -- as soon as the build thread's wait ends
            made.clear()
            del store, thread
            raise
        if "error" in made:
            raise made["error"]
        self.pg = made["pg"]
        _check(
            {url: deadline.result(f, "joining the weights-update group") for url, f in futures.items()},
            "/init_weights_update_group",
        )
        self.members = list(members)

    def send(
        self, pool: Any, bucket: list[tuple[str, torch.Tensor]], version: int, last: bool, deadline: Deadline
    ) -> int:
        """One bucket to every member (the sync's `last` bucket flushes the cache and sets the version); returns
        the bytes broadcast."""
        body: dict[str, Any] = {
            "names": [n for n, _ in bucket],
            "dtypes": [_DTYPE_NAMES[t.dtype] for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.name,
            "flush_cache": last,
        }
        if last:
            body["weight_version"] = str(version)
        futures = {
            url: pool.submit(
                pool.request(
                    pool.replicas[url], "/update_weights_from_distributed", body, timeout_s=max(deadline.left(), 1.0)
                )
            )
            for url in self.members
        }
        works = [dist.broadcast(t, group=self.pg, group_src=0, async_op=True) for _, t in bucket]
        deadline.until(lambda: all(w.is_completed() for w in works), f"broadcasting a bucket of {len(bucket)} tensors")
        for w in works:
            w.wait()  # raises the backend's error, if any
        answers = {
            url: deadline.result(f, "the servers' answers to /update_weights_from_distributed")
            for url, f in futures.items()
        }
        _check(answers, "/update_weights_from_distributed")
        return sum(t.numel() * t.element_size() for _, t in bucket)

    def close(self, pool: Any, timeout_s: float = 30.0) -> None:
        """Destroy the group here and (best effort) on the servers. Destroying our end first also ends a server
        blocked in a broadcast of an aborted sync (its peer is gone), so its destroy request can be served."""
        if self.pg is None:
            return
        pg, self.pg = self.pg, None
        try:
            dist.destroy_process_group(pg)
        except Exception:  # noqa: BLE001 -- a group with a dead member may fail to tear down cleanly
            pass
        futures = [
            pool.submit(
                pool.request(
                    pool.replicas[u], "/destroy_weights_update_group", {"group_name": self.name}, timeout_s=timeout_s
                )
            )
            for u in self.members
        ]
        for f in futures:
            _answer(f)
        self.members = []


def _answer(fut: Any) -> Any:
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 -- turned into a RolloutError naming the server by _check
        return exc


def _failed(answer: Any) -> bool:
    return isinstance(answer, Exception) or not (isinstance(answer, dict) and answer.get("success"))


def check_answers(answers: dict[str, Any], endpoint: str) -> None:
    """RolloutError naming the first server whose answer to `endpoint` is an error or `success: false`."""
    bad = {u: a for u, a in answers.items() if _failed(a)}
    if bad:
        url, a = next(iter(bad.items()))
        raise RolloutError(f"rollout server {url}: {endpoint} failed: {a}")


_check = check_answers


# ----------------------------------------------------------------------------- disk


def version_dir(sync_dir: str | Path, version: int) -> Path:
    return Path(sync_dir) / f"step_{version:08d}"


def write_stage_shard(tmp_dir: Path, stage: int, n_stages: int, tensors: dict[str, torch.Tensor]) -> int:
    """This stage's safetensors shard in the temporary version dir; returns its bytes."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp_dir / f"model-{stage + 1:05d}-of-{n_stages:05d}.safetensors"), metadata={"format": "pt"})
    (tmp_dir / f"names-{stage:05d}.json").write_text(json.dumps(sorted(cpu)))
    return sum(v.numel() * v.element_size() for v in cpu.values())


def finish_version_dir(
    tmp_dir: Path, final: Path, n_stages: int, hf_config: dict, tokenizer_dir: str | None, dtype: torch.dtype
) -> None:
    """Index, config and tokenizer files, then the atomic rename of `tmp_dir` to `final` (rank 0)."""
    weight_map = {}
    for stage in range(n_stages):
        names_file = tmp_dir / f"names-{stage:05d}.json"
        shard = f"model-{stage + 1:05d}-of-{n_stages:05d}.safetensors"
        weight_map.update({n: shard for n in json.loads(names_file.read_text())})
        names_file.unlink()
    (tmp_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    cfg = dict(hf_config, torch_dtype=_DTYPE_NAMES.get(dtype, "float32"))
    (tmp_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer_dir:
        from megatron_camopd.backend.hf_mapping import _TOKENIZER_FILES

        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp_dir / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)


def remove_other_versions(sync_dir: str | Path, keep: Path) -> None:
    """One version dir at a time: delete the others (and stale temporary dirs) once the servers loaded `keep`."""
    root = Path(sync_dir)
    for p in root.glob("step_*"):
        if p != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)
