"""In-process teachers: a frozen Megatron model on the student's ranks, scoring rollouts with the same TP/PP.

`MegatronTeacher.score_batch` is collective over the model-parallel group (every rank passes the same
sequences), runs a forward-only pass through megatron-core's schedule and returns per-response-token log-probs
and, for the top-k loss, the teacher's top-k ids and log-probs — computed on the vocab-sharded logits without
gathering the vocabulary. It implements the same `Teacher` interface as the HTTP client.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import torch

from megatron_camopd.backend.forward import ParallelGroups, forward_collect
from megatron_camopd.backend.model import ModelArch
from megatron_camopd.backend.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_topk
from megatron_camopd.teachers.base import TeacherScores, check_start


def pad_sequences(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def score_fn(top_k: int | None, tp_group, vocab_size: int):
    """Forward-collect function: label log-probs [b, s-1] (and top-k [b, s-1, K]) from vocab-sharded logits."""

    def fn(logits_shard: torch.Tensor, mb: dict) -> dict:
        logits = logits_shard[:, :-1]
        labels = mb["tokens"][:, 1:]
        out = {"logprobs": vocab_parallel_logprobs(logits, labels, tp_group, vocab_size=vocab_size).float()}
        if top_k:
            lp, ids = vocab_parallel_topk(logits, top_k, tp_group, vocab_size=vocab_size)
            out["topk_lp"], out["topk_ids"] = lp.float(), ids
        return out

    return fn


class MegatronTeacher:
    """A frozen teacher model held in process (loaded from a HF dir or a checkpoint of this project)."""

    def __init__(
        self,
        name: str,
        chunks: list,
        arch: ModelArch,
        *,
        pad_id: int,
        micro_batch_size: int = 1,
        source: str | Path = "",
        tokenizer_fingerprint: str | None = None,
    ) -> None:
        self.name = name
        self.chunks = chunks
        self.arch = arch
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size
        self.groups = ParallelGroups.from_parallel_state()
        self.source = str(source)
        self.tokenizer_fingerprint = tokenizer_fingerprint
        for c in chunks:
            c.eval()
            for p in c.parameters():
                p.requires_grad_(False)

    def score_batch(self, seqs: list[list[int]], starts: list[int], top_k: int | None = None) -> list[TeacherScores]:
        for s, st in zip(seqs, starts):
            check_start(s, st, f"teacher {self.name}")
        tokens = pad_sequences(seqs, self.pad_id)
        batch = {"tokens": tokens, "seq_len": torch.tensor([len(s) for s in seqs])}  # per-micro-batch widths
        res = forward_collect(
            self.chunks,
            batch,
            score_fn(top_k, self.groups.tp, self.arch.vocab_size),
            self.groups,
            micro_batch_size=self.micro_batch_size,
        )
        out = []
        for i, (s, st) in enumerate(zip(seqs, starts)):
            sl = slice(st - 1, len(s) - 1)  # logits at j predict token j+1
            out.append(
                TeacherScores(
                    logprobs=res["logprobs"][i, sl].contiguous(),
                    topk_ids=res["topk_ids"][i, sl].contiguous() if top_k else None,
                    topk_logprobs=res["topk_lp"][i, sl].contiguous() if top_k else None,
                )
            )
        return out

    async def score(self, ids: list[int], start: int, top_k: int | None = None) -> TeacherScores:
        # Collective: only meaningful when every model-parallel rank scores the same sample at the same time.
        return (await asyncio.to_thread(self.score_batch, [ids], [start], top_k))[0]

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.source,
            "tokenizer_path": self.source,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }

    def close(self) -> None:
        self.chunks = []
