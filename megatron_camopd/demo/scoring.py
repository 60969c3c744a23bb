"""Greedy exact-match accuracy of a model of this project (HF dir or Megatron checkpoint), in process.

The demo and `camopd compare` evaluate every model the same way: render each held-out example's chat messages
with the tokenizer's template, decode greedily through the rollout `Sampler` seam (the KV-cached `megatron` engine by
default, `SamplingParams(greedy=True)`), cut at the first stop token and compare with the reference answer
(`data.synthetic.score_exact`). Accuracy is reported overall and per task.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from megatron_camopd.backend.cpu_runtime import init_distributed
from megatron_camopd.backend.engine import build_chunks
from megatron_camopd.backend.forward import ParallelGroups
from megatron_camopd.data.synthetic import score_exact, task_of
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.rollout.sampler import InProcessModel, build_sampler
from megatron_camopd.rollout.sampling import SamplingParams


class GreedyModel:
    """A frozen model loaded for evaluation (world size 1 or the current parallel layout at TP=PP=1)."""

    def __init__(
        self, *, hf_path: str | Path | None = None, checkpoint: str | Path | None = None, engine: str = "megatron"
    ) -> None:
        from megatron_camopd.backend.model_source import ModelSource

        init_distributed(1, 1, None, seed=0)
        src = ModelSource.resolve(str(hf_path) if hf_path else None, str(checkpoint) if checkpoint else None, "model")
        self.arch = src.arch()
        self.chunks, _ = build_chunks(self.arch, 1, 1, None, "fp32")
        src.load_into(self.chunks, self.arch)
        for c in self.chunks:
            c.eval()
        self.tokenizer = Tokenizer.from_dir(src.config_dir)
        self.groups = ParallelGroups.from_parallel_state()
        self.engine = engine

    def answer(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 128) -> list[str]:
        tok = self.tokenizer
        params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens, stop_token_ids=tuple(tok.stop_ids))
        model = InProcessModel(
            self.chunks,
            self.groups,
            self.arch.vocab_size,
            max_context=max(len(p) for p in prompts) + max_new_tokens,
            pad_id=tok.pad_id,
            eos_id=tok.eos_id,
            micro_batch_size=batch_size,
        )
        sampler = build_sampler(self.engine, model)
        out: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            rolls = sampler.generate(chunk, params, [0] * len(chunk))
            out.extend(tok.decode(r.response_ids, skip_special_tokens=True) for r in rolls)
        return out

    def accuracy(self, examples: list[dict], max_new_tokens: int) -> dict:
        """{"accuracy": overall, "per_task": {task: acc}, "n": count} under greedy exact match."""
        tok = self.tokenizer
        prompts = [tok.apply_chat_template(ex["messages"], add_generation_prompt=True) for ex in examples]
        with torch.no_grad():
            answers = self.answer(prompts, max_new_tokens)
        per: dict[str, list[float]] = defaultdict(list)
        for ex, a in zip(examples, answers):
            per[task_of(ex)].append(score_exact(a, str(ex["answer"])))
        scores = [v for vals in per.values() for v in vals]
        return {
            "accuracy": sum(scores) / max(len(scores), 1),
            "n": len(scores),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per.items())},
            "samples": [
                {"prompt": ex["messages"][-1]["content"], "answer": str(ex["answer"]), "output": a}
                for ex, a in list(zip(examples, answers))[:3]
            ],
        }


def evaluate_model(eval_sets: dict[str, list[dict]], max_new_tokens: int, **source) -> dict[str, dict]:
    """Accuracy on each named evaluation set (e.g. general, domain) of one model."""
    model = GreedyModel(**source)
    return {name: model.accuracy(exs, max_new_tokens) for name, exs in eval_sets.items()}
