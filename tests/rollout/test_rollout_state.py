"""What a rollout on the trainer's own model leaves for the next training step -- the first GPU step's crashes,
reproduced on CPU with real megatron-core:

- no inference tensors: under `torch.inference_mode()` megatron-core's lazily built RoPE table (its
  `RotaryEmbedding.forward` lru_cache, shared with training for the same length) became an inference tensor, and
  full recompute saves it for backward ("Inference tensors cannot be saved for backward"; on GPU TE's fused RoPE
  and TE's in-place FP8 state updates fail the same way). Every live tensor of the process is scanned.
- FP8 weight copies: TE recasts a layer's FP8 weight only on a forward with `is_first_microbatch` set (megatron-core's
  schedule sets it on a training step's first micro-batch). A probe module with TE's contract shows that a
  rollout's first forward sets it, so a rollout after an optimizer step samples with the new weights.
"""

from __future__ import annotations

import gc

import pytest
import torch

from megatron_camopd.backend.loss import LossSpec
from megatron_camopd.rollout.kv_engine import MegatronSampler
from megatron_camopd.rollout.sampler import InProcessModel
from megatron_camopd.rollout.sampling import SamplingParams

PROMPT, NEW = 6, 10  # every row runs to its length: width PROMPT + NEW, the rollout's cache length


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny Qwen3 student (RoPE, QK-norm) under Megatron DDP with full activation recompute."""
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.engine import Engine, OptimSettings
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch
    from tests.backend._workers import make_tiny_hf

    init_distributed(1, 1)
    hf = make_tiny_hf("qwen3", tmp_path_factory.mktemp("state") / "qwen3")
    arch = ModelArch.from_hf_dir(hf)
    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return Engine(
        arch,
        micro_batch_size=2,
        optim=OptimSettings(lr=1e-3),
        init_fn=lambda chunks: load_hf_weights(chunks, hf, arch, 0, 1, 0, 1),
        model_fields=full,
    )


def _sampler(engine) -> MegatronSampler:
    model = InProcessModel(
        engine.chunks, engine.groups, engine.arch.vocab_size, max_context=32, pad_id=0, eos_id=None, micro_batch_size=2
    )
    return MegatronSampler(model)


def _rollouts(sampler: MegatronSampler, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 300, (PROMPT,), generator=g).tolist() for _ in range(2)]
    return sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=NEW), [seed, seed + 1])


def _batch(rollouts) -> dict[str, torch.Tensor]:
    n, width = len(rollouts), PROMPT + NEW
    tokens = torch.tensor([r.ids for r in rollouts])
    resp = slice(PROMPT - 1, width - 1)
    mask, lp = torch.zeros(n, width), torch.zeros(n, width)
    mask[:, resp] = 1.0
    lp[:, resp] = torch.stack([r.logprobs for r in rollouts])
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": mask,
        "sample_weight": torch.ones(n),
        "rollout_lp": lp,
        "advantages": torch.ones(n, width),
        "token_weight": torch.ones(n, width),
        "seq_len": torch.full((n,), width),
    }


def _inference_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_inference())


def test_rollout_leaves_no_inference_tensors_and_training_with_recompute_follows(engine) -> None:
    before = _inference_tensors()
    sampler = _sampler(engine)
    for step in range(2):  # rollout -> train -> rollout -> train
        rollouts = _rollouts(sampler, seed=10 * step)
        assert all(len(r.response_ids) == NEW for r in rollouts)
        assert _inference_tensors() == before, "a rollout left inference tensors in model or library state"
        out = engine.train_step(_batch(rollouts), LossSpec(loss="pg"))
        assert out["update_ok"] and torch.isfinite(torch.tensor(out["loss"]))
        # the trainer's log-probs of the sampled tokens are the rollout's (fp32 on CPU: rounding only)
        assert out["train_rollout_lp_absdiff"] < 1e-5


def test_rollout_recasts_fp8_weight_copies(engine) -> None:
    """A module with TE's contract (`is_first_microbatch`: recast the cached FP8 weight when True, then False):
    after a training step it is False; the rollout's first forward must see True, later ones False."""
    seen: list[bool] = []
    probe = engine.models()[0].decoder.layers[0].mlp.linear_fc1

    def te_like(module, args):
        seen.append(module.is_first_microbatch)
        module.is_first_microbatch = False

    probe.is_first_microbatch = True
    handle = probe.register_forward_pre_hook(te_like)
    try:
        sampler = _sampler(engine)
        engine.train_step(_batch(_rollouts(sampler, seed=1)), LossSpec(loss="pg"))
        seen.clear()
        _rollouts(sampler, seed=2)
    finally:
        handle.remove()
        del probe.is_first_microbatch
    assert seen[0] is True and len(seen) > 1 and not any(seen[1:])
