"""The `reference` rollout engine: full recomputation of the prefix for every token. Exact, slow, the oracle.

Each decoding step is a forward-only pass through megatron-core's schedule (`Engine.forward` machinery:
`backend.forward.forward_collect`) over right-padded sequences (causal attention, so padding after a sequence
never affects it); the last pipeline stage samples the next token and the result is broadcast to every pipeline
rank. A T-token response costs ~T^2/2 token forwards: this engine exists so the tests can check the
production engines against an implementation with no cache at all. Never select it for real training.
"""

from __future__ import annotations

import torch

from megatron_camopd.backend.forward import forward_collect
from megatron_camopd.rollout.sampler import EngineOptions, InProcessModel, OnFinish
from megatron_camopd.rollout.sampling import (
    Rollout,
    SamplingParams,
    all_finished,
    make_rollout,
    sample_uniforms,
    token_stats,
)


def gather_rows(rows_shard: torch.Tensor, tp_group) -> torch.Tensor:
    """[b, V/tp] vocab shards -> [b, V] (only the current position's rows are ever gathered)."""
    import torch.distributed as dist

    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp == 1:
        return rows_shard
    parts = [torch.empty_like(rows_shard) for _ in range(tp)]
    dist.all_gather(parts, rows_shard.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


class ReferenceSampler:
    engine = "reference"

    @classmethod
    def create(cls, model: InProcessModel, options: EngineOptions) -> ReferenceSampler:
        """The registry's constructor (engines.py): the model is all it needs."""
        return cls(model)

    def __init__(self, model: InProcessModel) -> None:
        self.model = model

    def update_weights(self, step: int) -> dict[str, float]:
        return {}  # samples with the trainer's own chunks

    def close(self) -> None:
        pass

    def _step_fn(self, params: SamplingParams):
        vocab, tp_group = self.model.vocab_size, self.model.groups.tp

        def fn(logits_shard: torch.Tensor, mb: dict) -> dict:
            pos = mb["pos"]
            rows = logits_shard[torch.arange(pos.shape[0]), pos].float()
            full = gather_rows(rows, tp_group)[:, :vocab]  # drop Megatron's vocab padding
            return token_stats(full, mb["u"], params)

        return fn

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_finish: OnFinish | None = None
    ) -> list[Rollout]:
        m = self.model
        b = len(prompts)
        if b == 0:
            return []
        max_new = max(0, min(params.max_new_tokens, m.max_context - min(len(p) for p in prompts)))
        uniforms = sample_uniforms(seeds, max_new)
        stops = set(params.stop_token_ids) | ({m.eos_id} if m.eos_id is not None else set())
        width = max(len(p) for p in prompts) + max_new
        tokens = torch.full((b, width), m.pad_id, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts])
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        out: list[dict[str, list]] = [{k: [] for k in ("token", "logprob", "entropy", "top1")} for _ in range(b)]
        active = [True] * b
        fn = self._step_fn(params)
        results: list[Rollout | None] = [None] * b

        def finish(i: int, reason: str) -> None:
            active[i] = False
            results[i] = r = make_rollout(prompts[i], out[i], reason, {"engine": self.engine})
            if on_finish is not None:
                on_finish(i, r)

        for i in range(b):
            if max_new == 0 or len(prompts[i]) >= m.max_context:
                finish(i, "context")
        for t in range(max_new):
            rows = [i for i in range(b) if active[i]]
            if not rows:
                break
            cur = int(lengths[rows].max())
            batch = {"tokens": tokens[rows, :cur], "pos": lengths[rows] - 1, "u": uniforms[rows, t]}
            res = forward_collect(m.chunks, batch, fn, m.groups, micro_batch_size=m.micro_batch_size)
            for j, i in enumerate(rows):
                tok = int(res["token"][j])
                for k in out[i]:
                    out[i][k].append(res[k][j].item())
                tokens[i, lengths[i]] = tok
                lengths[i] += 1
                if tok in stops:
                    finish(i, "stop")
                elif len(out[i]["token"]) >= params.max_new_tokens:
                    finish(i, "length")
                elif int(lengths[i]) >= m.max_context or int(lengths[i]) >= width:
                    finish(i, "context")
        return all_finished(results)
