"""Helpers for the conversion tests: tiny HF models with a tiny tokenizer, and the TP=2 re-save worker.

Worker functions live here (not in test modules) so spawned ranks import them without pytest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.helpers import tiny_hf_model


def make_tiny_hf_with_tokenizer(kind: str, out: Path, seed: int = 0) -> Path:
    """A tiny random HF model ('qwen3', 'qwen3_tied' or 'llama'; GQA 4/2; perturbed norms) sized to a tiny
    tokenizer saved beside it."""
    from megatron_camopd.data.tokenizer import Tokenizer, make_tiny_tokenizer

    make_tiny_tokenizer(out)
    vocab = Tokenizer.from_dir(out).vocab_size  # 102: pads to 128 at TP=1 and 256 at TP=2
    if kind.startswith("qwen3"):
        extra: dict[str, Any] = dict(arch="qwen3", tie_word_embeddings=kind.endswith("tied"), rope_theta=1e6)
    else:
        extra = dict(arch="llama", tie_word_embeddings=False)
    return tiny_hf_model(out, vocab_size=vocab, seed=seed, perturb_norms=True, **extra)


def positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)


def tp2_resave_worker(rank: int, world: int, pairs: list[tuple[Path, Path]], ids: torch.Tensor) -> dict[str, Any]:
    """For each (src root, dst root): load ``src`` at TP=world, return the full logits, save again under ``dst``."""
    from megatron_camopd.backend.checkpoint import (
        find_model_meta,
        load_model_only,
        resolve_checkpoint,
        save_checkpoint,
        write_model_meta,
    )
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.model import ModelArch, build_model_chunks, transformer_config

    init_distributed(tp=world, pp=1)
    out: dict[str, Any] = {}
    for src, dst in pairs:
        meta = find_model_meta(src)
        arch = ModelArch.from_hf_dir(meta)
        chunks = build_model_chunks(arch, transformer_config(arch, tp=world, pp=1), parallel_output=False)
        load_model_only(resolve_checkpoint(src), chunks)
        with torch.no_grad():
            logits = chunks[0].eval()(ids, positions(ids), attention_mask=None)
        if rank == 0:
            import json

            write_model_meta(dst, json.loads((meta / "config.json").read_text()), meta)
        save_checkpoint(dst, 4, chunks, train_state={"resaved_at_tp": world})
        out[str(dst)] = logits[..., : arch.vocab_size]
    init_distributed(tp=1, pp=world)  # then the TP=2 checkpoint, loaded and re-saved at PP=2 (one layer a stage)
    for _, src in pairs:
        meta = find_model_meta(src)
        arch = ModelArch.from_hf_dir(meta)
        chunks = build_model_chunks(arch, transformer_config(arch, tp=1, pp=world))
        load_model_only(resolve_checkpoint(src), chunks)
        dst = Path(str(src) + "_pp")
        if rank == 0:
            import json

            write_model_meta(dst, json.loads((meta / "config.json").read_text()), meta)
        save_checkpoint(dst, 6, chunks)
    return out
