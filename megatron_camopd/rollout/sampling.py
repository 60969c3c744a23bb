"""Sampling maths shared by every rollout engine: parameters, per-sample seeds, the token choice, the result type.

Every engine (the in-process `megatron` KV-cached engine, the `reference` full-recompute oracle, and the CPU
stand-in of an SGLang server) draws its uniforms from one generator per sample seeded by
`sample_seed(seed, step, global sample index)` and chooses tokens by inverse-CDF on the (temperature, top-k, top-p)
distribution of the current position only (`[b, V]` rows, never `[b, s, V]`). Response token t of a sample uses
uniform t of its own stream, so the same spec samples the same tokens whatever the engine, batch composition,
TP/PP/DP layout (up to float rounding at a CDF boundary; greedy decoding is identical).

Per generated token an engine keeps the rollout log-prob at temperature 1 (`mu`, for the importance weight), the
student entropy and the student's top-1 id (SelecTKD): `token_stats` computes all four from one `[b, V]` row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 32768
    stop_token_ids: tuple[int, ...] = ()
    greedy: bool = False


@dataclass
class Rollout:
    """One sampled response and its rollout-time statistics (all per response token)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor  # [n] log mu(y_t | h_t) at temperature 1
    entropy: torch.Tensor | None  # [n]; None when the engine did not compute it (sglang without a need)
    top1: torch.Tensor  # [n] long
    finish_reason: str = "length"  # "stop" | "length" | "context" | "abort"
    meta: dict = field(default_factory=dict)  # e.g. {"weight_version": 3, "engine": "sglang"}

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for sample `index` of step `step` (stable across runs, machines and layouts)."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_uniforms(seeds: list[int], n: int) -> torch.Tensor:
    """[len(seeds), max(n, 1)] float64 uniforms: row i is the stream of the sample seeded by seeds[i]."""
    n = max(n, 1)
    if not seeds:
        return torch.empty((0, n), dtype=torch.float64)
    return torch.stack(
        [torch.rand(n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    )


def choose_tokens(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Inverse-CDF sampling from [b, V] fp32 logits with temperature/top-k/top-p, given uniforms u [b].

    The uniforms are drawn on the CPU (per-sample generators, identical on every machine); they are moved to the
    logits' device here, so CUDA logits sample as CPU logits do."""
    if params.greedy or params.temperature == 0.0:
        return logits.argmax(dim=-1)
    u = u.to(logits.device)
    scaled = logits / params.temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    if params.top_k and params.top_k > 0:
        sorted_logits[:, params.top_k :] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    if params.top_p < 1.0:
        cum = probs.cumsum(-1)
        drop = (cum - probs) >= params.top_p  # keep the smallest prefix reaching top_p
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).to(cdf.dtype)).clamp_max(cdf.shape[-1] - 1)
    return order.gather(-1, idx).squeeze(-1)


def token_stats(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> dict[str, torch.Tensor]:
    """From [b, V] logits (true vocabulary only): the chosen token, its log-prob at T=1, entropy, top-1 id."""
    full = logits.float()
    logp = torch.log_softmax(full, dim=-1)
    token = choose_tokens(full, u, params)
    return {
        "token": token,
        "logprob": logp.gather(-1, token.unsqueeze(-1)).squeeze(-1),
        "entropy": -(logp.exp() * logp).sum(-1),
        "top1": full.argmax(-1),
    }


def make_rollout(prompt: list[int], out: dict[str, list], reason: str, meta: dict | None = None) -> Rollout:
    """A `Rollout` from per-token python lists `out[token|logprob|entropy|top1]`."""
    return Rollout(
        prompt_ids=list(prompt),
        response_ids=[int(t) for t in out["token"]],
        logprobs=torch.tensor(out["logprob"], dtype=torch.float32),
        entropy=torch.tensor(out["entropy"], dtype=torch.float32),
        top1=torch.tensor(out["top1"], dtype=torch.long),
        finish_reason=reason,
        meta=dict(meta or {}),
    )


def all_finished(results: list[Rollout | None]) -> list[Rollout]:
    """The rollouts of a batch in which every sample has finished (a missing one is a decoding bug)."""
    out = [r for r in results if r is not None]
    if len(out) != len(results):
        raise RuntimeError(f"{len(results) - len(out)} of {len(results)} samples never finished")
    return out
