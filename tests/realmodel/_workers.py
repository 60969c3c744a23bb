"""Functions run on spawned gloo ranks by the real-model tests (module level so spawn can import them)."""

from __future__ import annotations

from typing import Any


def tp_logits_worker(rank: int, world: int, ckpt: str, ids: list[int]) -> dict[str, Any]:
    """Logits [1, S, V] of the checkpoint ``ckpt`` loaded at TP=world (full vocabulary gathered, padding dropped),
    with the TP layout actually built (heads and KV groups per rank)."""
    import torch

    from megatron_camopd.backend.checkpoint import find_model_meta, load_model_only, resolve_checkpoint
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.model import ModelArch, build_model_chunks, transformer_config

    init_distributed(tp=world, pp=1)
    arch = ModelArch.from_hf_dir(find_model_meta(ckpt))
    config = transformer_config(arch, tp=world, pp=1)
    chunks = build_model_chunks(arch, config, parallel_output=False)
    load_model_only(resolve_checkpoint(ckpt), chunks)
    t = torch.tensor([ids])
    with torch.no_grad():
        logits = chunks[0].eval()(t, torch.arange(len(ids)).unsqueeze(0), attention_mask=None)
    attn = chunks[0].decoder.layers[0].self_attention
    return {
        "logits": logits[..., : arch.vocab_size].float(),
        "heads_per_rank": attn.num_attention_heads_per_partition,
        "kv_groups_per_rank": attn.num_query_groups_per_partition,
    }
