"""The one `Sampler` seam every generating caller uses: training rollouts, Uni-OPD offline balancing, `camopd eval`,
the demo's scoring and the CPU rollout server.

`rollout.engine` selects the implementation:
  megatron   KV-cached decoding through megatron-core's inference context on the student's own model chunks
             (TP/PP aware; the default in process) -- `rollout/kv_engine.py`;
  sglang     the student served by SGLang rollout servers, weights synced after every optimizer step
             (the production engine at scale) -- `rollout/sglang.py`;
  vllm       the student served by vLLM servers, weights reloaded from disk after every optimizer step
             (per-request seeds of vLLM's own: not the other engines' tokens) -- `rollout/vllm.py`;
  reference  full recomputation of the prefix per token through megatron-core's forward schedule: slow, exact,
             the oracle of the tests and never the production path -- `rollout/reference.py`.
The in-process engines and SGLang sample the same tokens for the same per-sample seeds (see `rollout/sampling.py`).

Contract of `Sampler.generate(prompts, params, seeds, on_finish)`: every rank of the model-parallel group calls it
with the same arguments and gets the same rollouts back, in prompt order; `on_finish(i, rollout)` is called once
per sample on every rank, on the model-parallel leader as soon as sample i has finished (so teacher scoring
overlaps generation). `update_weights(step)` runs after every optimizer step (a no-op in process; the weight sync
of served engines) and returns metrics for the step's row. With `rollout.max_staleness > 0` the training loop
samples through `rollout/pipeline.py` instead (a thread beside the trainer: a second in-process model, or the
served engine's collective-free `generate_detached`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from megatron_camopd.config.sections import SERVED_ENGINES
from megatron_camopd.rollout.sampling import Rollout, SamplingParams

if TYPE_CHECKING:
    from megatron_camopd.backend.forward import ParallelGroups

ENGINES = ("megatron", "sglang", "vllm", "reference")
SERVED = SERVED_ENGINES  # engines on servers: detached generation in the pipeline, weights synced per step
OnFinish = Callable[[int, Rollout], None]


@runtime_checkable
class Sampler(Protocol):
    engine: str

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_finish: OnFinish | None = None
    ) -> list[Rollout]:
        """One response per prompt (see the module docstring for the collective contract)."""
        ...

    def update_weights(self, step: int) -> dict[str, float]:
        """Make the engine sample with the trainer's current weights (after optimizer step `step`)."""
        ...

    def close(self) -> None:
        """Release servers, threads and caches. Idempotent."""
        ...


@dataclass
class InProcessModel:
    """What an in-process engine decodes with: this rank's model chunks and the facts around them."""

    chunks: list  # this rank's GPTModel chunks (DDP-wrapped or bare), one per virtual pipeline stage
    groups: ParallelGroups
    vocab_size: int  # the true (unpadded) vocabulary: Megatron's padding ids are never sampled
    max_context: int  # prompt + response never exceed this many tokens
    pad_id: int
    eos_id: int | None
    micro_batch_size: int = 1  # the reference engine's forward micro-batch


def needs_entropy(method) -> bool:
    """Whether a method (algo.methods) trains on the student's per-token entropy (e.g. relaxed_opd)."""
    return method is not None and "entropy" in method.required(None)


def build_sampler(
    engine: str,
    model: InProcessModel,
    *,
    kv_cache_gb: float = 16.0,
    servers=None,
    trainer=None,
    seed: int = 0,
    need_entropy: bool = False,
    model_dir=None,
    tokenizer_dir=None,
    stop_requested: Callable[[], bool] | None = None,
) -> Sampler:
    """The sampler for `engine` (`rollout.engine`). `servers` (rollout.sglang), `trainer` (the training Engine,
    whose weights are synced to the servers), `need_entropy` (the servers return none: computed in process when
    the method needs it), `model_dir` / `tokenizer_dir` (config.json and tokenizer files written next to the
    weights of a disk sync) and `stop_requested` (the trainer's preemption flag, honoured within a weight sync)
    are for the served engines (`sglang`, `vllm`: `servers` is then rollout.vllm) only."""
    if engine == "megatron":
        from megatron_camopd.rollout.kv_engine import MegatronSampler

        return MegatronSampler(model, kv_cache_gb=kv_cache_gb)
    if engine == "reference":
        from megatron_camopd.rollout.reference import ReferenceSampler

        return ReferenceSampler(model)
    if engine in SERVED:
        from megatron_camopd.rollout.sglang import SglangSampler
        from megatron_camopd.rollout.vllm import VllmSampler

        return (VllmSampler if engine == "vllm" else SglangSampler)(
            servers,
            model=model,
            trainer=trainer,
            seed=seed,
            need_entropy=need_entropy,
            model_dir=model_dir,
            tokenizer_dir=tokenizer_dir,
            stop_requested=stop_requested,
        )
    raise ValueError(f"rollout.engine: {engine!r} is not one of {', '.join(ENGINES)}")
