"""The one `Sampler` seam every generating caller uses: training rollouts, Uni-OPD offline balancing, `camopd eval`,
the demo's scoring and the CPU rollout server.

`rollout.engine` selects the implementation, by its entry in the engine registry (`megatron_camopd/engines.py`):
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
served engine's collective-free `generate_detached`: a served engine's sampler is a `ServedSampler`).
`build_sampler` builds every engine the same way, `Class.create(model, EngineOptions(...))`: a new engine is its
module plus one `register_engine` entry (`megatron_camopd/engines.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from megatron_camopd.engines import engine_info, resolve
from megatron_camopd.rollout.sampling import Rollout, SamplingParams

if TYPE_CHECKING:
    from megatron_camopd.backend.forward import ParallelGroups

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


@runtime_checkable
class ServedSampler(Sampler, Protocol):
    """A served engine's sampler (`served=True` in the registry): what the overlapped pipeline
    (`rollout/pipeline.py`) calls besides `generate`."""

    def ensure_synced(self) -> None:
        """Collective (main thread): the servers hold the trainer's current weights before any detached call."""
        ...

    def generate_detached(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_finish: OnFinish | None = None
    ) -> list[Rollout] | None:
        """`generate` without any collective, on a thread beside the trainer: the model-parallel leader's rollouts,
        None on the other ranks."""
        ...

    def share(self, rollouts: list[Rollout] | None, error: str | None) -> list[Rollout]:
        """Collective over the model-parallel group: the leader's rollouts (or its error, raised on every rank)."""
        ...

    def fill_entropy(self, rollouts: list[Rollout]) -> None:
        """Entropy where the method needs it (a forward with the trainer's current weights), else None."""
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


@dataclass
class EngineOptions:
    """What a sampler may need besides the model (`Sampler.create`): in-process engines read `kv_cache_gb`; served
    ones their `servers` section (`rollout.<servers>` of the registry entry), the training `trainer` whose weights
    they sync, `seed` (replica choice), `need_entropy` (servers return none: computed in process when the method
    needs it), `model_dir` / `tokenizer_dir` (config.json and tokenizer files written next to the weights of a disk
    sync) and `stop_requested` (the trainer's preemption flag, honoured within a weight sync)."""

    kv_cache_gb: float = 16.0
    servers: Any = None
    trainer: Any = None
    seed: int = 0
    need_entropy: bool = False
    model_dir: Any = None
    tokenizer_dir: Any = None
    stop_requested: Callable[[], bool] | None = None


def build_sampler(engine: str, model: InProcessModel, **options: Any) -> Sampler:
    """The sampler of `engine` (`rollout.engine`), looked up in the engine registry and imported now; `options`
    are the fields of `EngineOptions`. A served engine's sampler must implement `ServedSampler`."""
    info = engine_info(engine)
    cls = resolve(info.sampler)
    sampler = cls.create(model, EngineOptions(**options))
    if info.served and not isinstance(sampler, ServedSampler):
        raise TypeError(f"rollout engine {engine!r} is served but {info.sampler} is no ServedSampler")
    return cast(Sampler, sampler)
