"""On-policy rollouts: the student samples responses with its own Megatron model (TP/PP aware).

Each decoding step is a forward-only pass through megatron-core's schedule over right-padded sequences (causal
attention, so padding after a sequence never affects it); the last pipeline stage samples the next token and the
result is broadcast to every pipeline rank. Full recomputation per step (no KV cache) keeps it simple and exact;
it is the embedded/CPU path — production rollouts at 32k tokens belong on an inference engine.

Sampling is reproducible and layout-independent: every sample draws its uniforms from its own generator seeded
by `(seed, step, global sample index)`, and tokens are chosen by inverse-CDF on the (temperature, top-k, top-p)
distribution gathered for the current position only ([b, V] rows, never [b, s, V]). The same spec therefore
samples the same tokens at TP=1, TP=2, PP=2 or DP=2 (up to float rounding at a CDF boundary).

Per generated token we keep the rollout log-prob at temperature 1 (`mu`, for the importance weight), the
student entropy and the student's top-1 id (SelecTKD).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
    entropy: torch.Tensor  # [n]
    top1: torch.Tensor  # [n] long
    finish_reason: str = "length"  # "stop" | "length" | "context"
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for sample `index` of step `step` (stable across runs, machines and layouts)."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _gather_rows(rows_shard: torch.Tensor, tp_group) -> torch.Tensor:
    """[b, V/tp] vocab shards -> [b, V] (only the current position's rows are ever gathered)."""
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp == 1:
        return rows_shard
    parts = [torch.empty_like(rows_shard) for _ in range(tp)]
    dist.all_gather(parts, rows_shard.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def choose_tokens(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Inverse-CDF sampling from [b, V] fp32 logits with temperature/top-k/top-p, given uniforms u [b]."""
    if params.greedy or params.temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / params.temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    if params.top_k and params.top_k > 0:
        sorted_logits[:, params.top_k:] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    if params.top_p < 1.0:
        cum = probs.cumsum(-1)
        drop = (cum - probs) >= params.top_p  # keep the smallest prefix reaching top_p
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).to(cdf.dtype)).clamp_max(cdf.shape[-1] - 1)
    return order.gather(-1, idx).squeeze(-1)


def _make_step_fn(params: SamplingParams, vocab_size: int, tp_group):
    def fn(logits_shard: torch.Tensor, mb: dict) -> dict:
        pos = mb["pos"]
        rows = logits_shard[torch.arange(pos.shape[0]), pos].float()
        full = _gather_rows(rows, tp_group)[:, :vocab_size]  # drop Megatron's vocab padding
        logp = torch.log_softmax(full, dim=-1)
        token = choose_tokens(full, mb["u"], params)
        return {
            "token": token,
            "logprob": logp.gather(-1, token.unsqueeze(-1)).squeeze(-1),
            "entropy": -(logp.exp() * logp).sum(-1),
            "top1": full.argmax(-1),
        }

    return fn


def generate(
    engine_forward,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    vocab_size: int,
    eos_id: int | None,
    pad_id: int,
    max_context: int,
    tp_group,
    seeds: list[int],
    on_finish=None,
) -> list[Rollout]:
    """Sample one response per prompt. `engine_forward(batch, fn)` is `Engine.forward` (or a teacher's).

    `on_finish(i, rollout)` is called as soon as sample i finishes, while the others still generate (overlap with
    teacher scoring). All ranks of the model-parallel group must call this with the same arguments.
    """
    b = len(prompts)
    if b == 0:
        return []
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    max_new = max(0, min(params.max_new_tokens, max_context - min(len(p) for p in prompts)))
    uniforms = torch.stack([torch.rand(max(max_new, 1), generator=g, dtype=torch.float64) for g in gens])
    stops = set(params.stop_token_ids) | ({eos_id} if eos_id is not None else set())
    width = max(len(p) for p in prompts) + max_new
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    out = {k: [[] for _ in range(b)] for k in ("token", "logprob", "entropy", "top1")}
    reasons = [None] * b
    active = [True] * b
    fn = _make_step_fn(params, vocab_size, tp_group)
    results: list[Rollout | None] = [None] * b

    def finish(i: int, reason: str) -> None:
        active[i] = False
        reasons[i] = reason
        results[i] = Rollout(
            prompt_ids=list(prompts[i]), response_ids=[int(t) for t in out["token"][i]],
            logprobs=torch.tensor(out["logprob"][i], dtype=torch.float32),
            entropy=torch.tensor(out["entropy"][i], dtype=torch.float32),
            top1=torch.tensor(out["top1"][i], dtype=torch.long), finish_reason=reason,
        )
        if on_finish is not None:
            on_finish(i, results[i])

    for i in range(b):
        if max_new == 0 or len(prompts[i]) >= max_context:
            finish(i, "context")
    for t in range(max_new):
        rows = [i for i in range(b) if active[i]]
        if not rows:
            break
        cur = int(lengths[rows].max())
        batch = {
            "tokens": tokens[rows, :cur],
            "pos": lengths[rows] - 1,
            "u": uniforms[rows, t],
        }
        res = engine_forward(batch, fn)
        for j, i in enumerate(rows):
            tok = int(res["token"][j])
            for k in out:
                out[k][i].append(res[k][j].item())
            tokens[i, lengths[i]] = tok
            lengths[i] += 1
            if tok in stops:
                finish(i, "stop")
            elif len(out["token"][i]) >= params.max_new_tokens:
                finish(i, "length")
            elif int(lengths[i]) >= max_context or int(lengths[i]) >= width:
                finish(i, "context")
    return [r for r in results]
