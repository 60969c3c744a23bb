"""Rollout-engine helpers run in the pytest process or on spawned gloo ranks (module level so spawn imports them)."""

from __future__ import annotations

from pathlib import Path

import torch

STOPS = tuple(range(40, 60))  # ~7% of a random model's mass: rows finish at different steps (exercises compaction)


def prompts_and_seeds(n: int = 10, vocab: int = 300) -> tuple[list[list[int]], list[int]]:
    """Prompts of different lengths (5..24 tokens, so long prompts feed their tail through decoding)."""
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(5, 25, (n,), generator=g).tolist()
    return [torch.randint(60, vocab, (k,), generator=g).tolist() for k in lens], [1000 + i for i in range(n)]


def params_list():
    from megatron_camopd.rollout.sampling import SamplingParams

    return [
        SamplingParams(greedy=True, max_new_tokens=24),
        SamplingParams(temperature=1.0, max_new_tokens=24, stop_token_ids=STOPS),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=30, stop_token_ids=STOPS),
    ]


def make_model(root: Path) -> Path:
    """A tiny random Llama (GQA 4/2, 2 layers, vocab 300: padded at TP=1 and TP=2) in HF format."""
    from megatron_camopd.data.tokenizer import make_tiny_tokenizer
    from megatron_camopd.demo.tiny import make_tiny_model

    make_tiny_tokenizer(root / "tok")
    return make_tiny_model(root / "llama", root / "tok", seed=3, arch="llama", vocab_size=300)


def in_process_model(hf_dir: Path, tp: int = 1, pp: int = 1, max_context: int = 48):
    from megatron.core import parallel_state as ps

    from megatron_camopd.backend.engine import build_chunks
    from megatron_camopd.backend.forward import ParallelGroups
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch
    from megatron_camopd.rollout.sampler import InProcessModel

    arch = ModelArch.from_hf_dir(hf_dir)
    chunks, _ = build_chunks(arch, tp, pp, None, "fp32")
    load_hf_weights(
        chunks, hf_dir, arch, ps.get_tensor_model_parallel_rank(), tp, ps.get_pipeline_model_parallel_rank(), pp
    )
    return InProcessModel(
        chunks,
        ParallelGroups.from_parallel_state(),
        arch.vocab_size,
        max_context=max_context,
        pad_id=0,
        eos_id=None,
        micro_batch_size=4,
    )


def as_data(rollouts) -> list[tuple]:
    return [(r.response_ids, r.logprobs, r.entropy, r.top1, r.finish_reason) for r in rollouts]


def generate_all(model, engine: str, **kwargs) -> list[list[tuple]]:
    from megatron_camopd.rollout.sampler import build_sampler

    prompts, seeds = prompts_and_seeds()
    sampler = build_sampler(engine, model, **kwargs)
    return [as_data(sampler.generate(prompts, p, seeds)) for p in params_list()]


def layout_worker(rank: int, world: int, hf_dir: Path, tp: int, pp: int) -> list[list[tuple]]:
    """Every params set through the megatron engine at TP=tp, PP=pp (world = tp * pp)."""
    from megatron_camopd.backend.cpu_runtime import init_distributed

    init_distributed(tp=tp, pp=pp, seed=0)
    return generate_all(in_process_model(hf_dir, tp, pp), "megatron")


def rng_fork_interleaving(rank: int, world: int) -> dict:
    """The interleaving that broke megatron-core's process-wide RNG tracker when the rollout thread and the trainer
    both ran a forward: rollout thread enters fork(), trainer enters fork(), rollout thread leaves, trainer leaves.
    Run once on a plain tracker and once with the pipeline's thread-routed one installed."""
    import threading

    from megatron.core import tensor_parallel

    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.rollout import pipeline

    init_distributed(1, 1)
    mrandom = tensor_parallel.random

    def interleave() -> str | None:
        tracker = mrandom.get_cuda_rng_tracker
        inside, leave = threading.Event(), threading.Event()

        def rollout_thread() -> None:
            pipeline._ROLLOUT_THREAD.active = routed
            with tracker().fork():
                inside.set()
                leave.wait(10)

        t = threading.Thread(target=rollout_thread)
        t.start()
        inside.wait(10)
        try:
            with tracker().fork():
                leave.set()
                t.join(10)
        except Exception as exc:  # noqa: BLE001 -- the failure under test
            return str(exc)
        finally:
            leave.set()
            t.join(10)
        return None

    routed = False
    plain = interleave()
    plain_name = mrandom.get_cuda_rng_tracker()._current_state_name
    mrandom.get_cuda_rng_tracker()._current_state_name = "default-rng"
    routed = True
    saved = pipeline._route_rng_tracker()
    try:
        with_routing = interleave()
        name = mrandom.get_cuda_rng_tracker()._current_state_name
    finally:
        mrandom._CUDA_RNG_STATE_TRACKER = saved
    return {"plain": plain, "plain_name": plain_name, "routed": with_routing, "routed_name": name}
