"""Sampling rules of the student's rollouts (pure tensor code): greedy, top-k, top-p, temperature, seeding."""

from __future__ import annotations

import torch

from megatron_camopd.rollout.sampling import SamplingParams, choose_tokens, sample_seed


def test_greedy_and_degenerate_filters_pick_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3, 1.9], [5.0, 0.0, 0.0, 4.0]])
    u = torch.tensor([0.99, 0.99], dtype=torch.float64)
    assert choose_tokens(logits, u, SamplingParams(greedy=True)).tolist() == [1, 0]
    assert choose_tokens(logits, u, SamplingParams(top_k=1)).tolist() == [1, 0]
    assert choose_tokens(logits, u, SamplingParams(top_p=1e-6)).tolist() == [1, 0]


def test_inverse_cdf_matches_distribution_and_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    u = torch.linspace(0.0005, 0.9995, 2000, dtype=torch.float64)
    toks = torch.stack([choose_tokens(logits, x.reshape(1), SamplingParams()) for x in u]).flatten()
    freq = torch.bincount(toks, minlength=4).float() / len(u)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=2e-3)
    toks = torch.stack([choose_tokens(logits, x.reshape(1), SamplingParams(top_p=0.8)) for x in u]).flatten()
    assert set(toks.tolist()) == {0, 1}  # smallest prefix reaching 0.8: {0.5, 0.3}
    toks = torch.stack([choose_tokens(logits, x.reshape(1), SamplingParams(top_k=3)) for x in u]).flatten()
    assert set(toks.tolist()) == {0, 1, 2}
    cold = torch.stack([choose_tokens(logits, x.reshape(1), SamplingParams(temperature=0.05)) for x in u]).flatten()
    assert (cold == 0).float().mean() > 0.99


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, 3, 7) == sample_seed(0, 3, 7)
    seeds = {sample_seed(0, s, i) for s in range(5) for i in range(50)}
    assert len(seeds) == 250


def test_cpu_uniforms_sample_logits_on_another_device():
    """The uniforms come from per-sample CPU generators; logits on a GPU (here the meta device, which refuses CPU
    operands as CUDA does) are sampled without a device mismatch, for every filter path."""
    from megatron_camopd.rollout.sampling import token_stats

    logits = torch.randn(3, 50, device="meta")
    u = torch.rand(3, dtype=torch.float64)
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9, top_k=5)):
        stats = token_stats(logits, u, params)
        assert {k: (v.device.type, tuple(v.shape)) for k, v in stats.items()} == dict.fromkeys(
            ("token", "logprob", "entropy", "top1"), ("meta", (3,))
        )
