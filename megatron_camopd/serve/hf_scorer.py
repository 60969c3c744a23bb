"""A `Scorer` over a HuggingFace-format checkpoint directory (transformers, fp32, CPU).

`camopd serve-teacher` uses it for HF dirs (camopd checkpoints go to `megatron_scorer.MegatronScorer`); it is also
how tests check that served log-probs equal a direct computation. The tokenizer fingerprint
(`data.tokenizer.hf_fingerprint`, the one the student computes) lets a client refuse a teacher whose tokenizer differs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import CheckpointError
from ..teachers.base import TeacherScores
from ..teachers.tokcheck import tokenizer_fingerprint


class HFScorer:
    """Full-sequence input log-probs of a `transformers` causal LM (temperature 1), batched with right padding."""

    def __init__(self, model: Any, tokenizer: Any | None, model_path: str | None, tokenizer_path: str | None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._model_path = model_path
        self._tokenizer_path = tokenizer_path
        self._fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
        self._vocab = int(model.get_output_embeddings().weight.shape[0])

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def score(self, seqs: list[list[int]], top_k: int | None) -> list[TeacherScores]:
        if not seqs:
            return []
        max_len = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(seqs), max_len, dtype=torch.long)
        attn = torch.zeros(len(seqs), max_len, dtype=torch.long)
        for b, s in enumerate(seqs):
            input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[b, : len(s)] = 1
        logits = self.model(input_ids=input_ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j+1
        out = []
        for b, s in enumerate(seqs):
            n = len(s) - 1
            row = logp[b, :n]
            lps = row.gather(-1, input_ids[b, 1 : n + 1].unsqueeze(-1)).squeeze(-1)
            if top_k:
                k = min(int(top_k), row.shape[-1])
                top = row.topk(k, dim=-1)
                out.append(TeacherScores(lps.clone(), top.indices.clone(), top.values.clone()))
            else:
                out.append(TeacherScores(lps.clone()))
        return out

    def vocab_size(self) -> int:
        return self._vocab

    def token_texts(self, ids: list[int]) -> list[str | None]:
        if self.tokenizer is None:
            return [None] * len(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self._model_path,
            "tokenizer_path": self._tokenizer_path,
            "tokenizer_fingerprint": self._fingerprint,
        }


def load_scorer(checkpoint_dir: str, tokenizer_dir: str | None = None) -> HFScorer:
    """Load a HuggingFace-format checkpoint (config.json + weights) as an fp32 CPU scorer.

    The tokenizer is read from `tokenizer_dir` (default: the checkpoint directory) when present; without one the
    server still scores ids but cannot return per-token texts or a fingerprint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        raise CheckpointError(f"{checkpoint_dir}: not a HuggingFace checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    tok_dir = tokenizer_dir or checkpoint_dir
    tokenizer = None
    if any(os.path.isfile(os.path.join(tok_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return HFScorer(
        model,
        tokenizer,
        model_path=os.path.abspath(checkpoint_dir),
        tokenizer_path=os.path.abspath(tok_dir) if tokenizer is not None else None,
    )
