"""Helpers for the backend tests: tiny HF checkpoints and the functions run on spawned gloo ranks.

Worker functions live here (not in test modules) so spawned processes import them without pytest.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from tests.helpers import tiny_hf_model

VOCAB = 300  # pads to 384 at TP=1 and 512 at TP=2: exercises padded-vocabulary masking


def make_tiny_hf(name: str, out: Path) -> Path:
    """Save a tiny random HF model (perturbed norms): 'qwen3' (head_dim 24 != 64/4), 'qwen3_tied', 'llama' (GQA 4/2),
    'llama_tied4' (4 layers for interleaved PP=2 x VPP=2, tied embeddings across stages)."""
    config: dict[str, Any] = dict(intermediate_size=96)
    if name.startswith("qwen3"):
        config.update(arch="qwen3", head_dim=24, tie_word_embeddings=name.endswith("tied"), rope_theta=1e6)
    elif name == "llama_tied4":
        config.update(arch="llama", tie_word_embeddings=True, num_hidden_layers=4)
    else:
        config.update(arch="llama", tie_word_embeddings=False)
    return tiny_hf_model(out, vocab_size=VOCAB, seed=zlib.crc32(name.encode()) % 1000, perturb_norms=True, **config)


def build_loaded(hf_dir: Path, tp: int, pp: int, vpp: Any = None) -> tuple[Any, list]:
    """ModelArch and this rank's model chunks loaded from ``hf_dir`` (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps

    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch, build_model_chunks, transformer_config

    arch = ModelArch.from_hf_dir(hf_dir)
    config = transformer_config(arch, tp=tp, pp=pp, vpp=vpp)
    chunks = build_model_chunks(arch, config)
    load_hf_weights(
        chunks, hf_dir, arch, ps.get_tensor_model_parallel_rank(), tp, ps.get_pipeline_model_parallel_rank(), pp
    )
    return arch, [c.eval() for c in chunks]


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)


def vocab_parallel_worker(
    rank: int,
    world: int,
    logits_full: torch.Tensor,
    ids: torch.Tensor,
    topk_ids: torch.Tensor,
    grad_lp: torch.Tensor,
    grad_at: torch.Tensor,
    vocab_size: int,
) -> dict:
    """Vocab-parallel maths at TP=world on slices of ``logits_full``; returns values and shard gradients."""
    from megatron.core import parallel_state as ps

    from megatron_camopd.backend import vocab_parallel as vp
    from megatron_camopd.backend.cpu_runtime import init_distributed

    init_distributed(tp=world, pp=1)
    group = ps.get_tensor_model_parallel_group()
    shard = torch.chunk(logits_full, world, dim=-1)[rank].clone().requires_grad_(True)
    lp = vp.vocab_parallel_logprobs(shard, ids, group, chunk_size=3, vocab_size=vocab_size)
    at = vp.vocab_parallel_logprobs_at(shard, topk_ids, group, chunk_size=5, vocab_size=vocab_size)
    ((lp * grad_lp).sum() + (at * grad_at).sum()).backward()
    top_vals, top_ids = vp.vocab_parallel_topk(shard.detach(), 4, group, chunk_size=3, vocab_size=vocab_size)
    return {
        "lp": lp.detach(),
        "at": at.detach(),
        "grad": shard.grad,
        "entropy": vp.vocab_parallel_entropy(shard.detach(), group, chunk_size=4, vocab_size=vocab_size),
        "top_vals": top_vals,
        "top_ids": top_ids,
        "argmax": vp.vocab_parallel_argmax(shard.detach(), group, vocab_size=vocab_size),
    }


def tp_model_worker(rank: int, world: int, hf_dir: Path, ids: torch.Tensor) -> dict:
    """TP=world GPTModel from HF weights: gathered logits, target log-probs, and the gathered full state dict."""
    from megatron.core import parallel_state as ps

    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.hf_mapping import gather_full_state_dict, megatron_to_hf_state_dict
    from megatron_camopd.backend.vocab_parallel import vocab_parallel_logprobs

    init_distributed(tp=world, pp=1)
    arch, chunks = build_loaded(hf_dir, tp=world, pp=1)
    group = ps.get_tensor_model_parallel_group()
    with torch.no_grad():
        shard = chunks[0](ids, _positions(ids), attention_mask=None)
    shards = [torch.empty_like(shard) for _ in range(world)]
    torch.distributed.all_gather(shards, shard.contiguous(), group=group)
    targets = torch.roll(ids, -1, dims=1)
    lp = vocab_parallel_logprobs(shard, targets, group, chunk_size=7, vocab_size=arch.vocab_size)
    hf_sd = megatron_to_hf_state_dict(gather_full_state_dict(chunks, arch), arch)
    return {
        "logits": torch.cat(shards, dim=-1)[..., : arch.vocab_size],
        "lp": lp,
        "hf_sd": hf_sd if rank == 0 else None,
    }


def pp_model_worker(rank: int, world: int, hf_dir: Path, ids: torch.Tensor, vpp: Any = None) -> dict:
    """PP=world (optionally interleaved, VPP=vpp) forward through megatron's pipeline schedule, one sequence
    per micro-batch; the last stage returns the logits of all micro-batches."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.hf_mapping import gather_full_state_dict, megatron_to_hf_state_dict

    init_distributed(tp=1, pp=world, vpp=vpp)
    arch, chunks = build_loaded(hf_dir, tp=1, pp=world, vpp=vpp)

    def loss_func(output: torch.Tensor) -> tuple:
        return output.sum(), {"logits": output.detach()}

    def forward_step(data_iterator: Any, model: Any) -> tuple:
        batch = next(data_iterator)
        return model(batch, _positions(batch), attention_mask=None), partial(loss_func)

    micro = list(ids.split(1))
    iterators = [iter(micro) for _ in chunks] if vpp else iter(micro)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks,
        num_microbatches=len(micro),
        seq_length=ids.shape[1],
        micro_batch_size=1,
        forward_only=True,
    )
    logits = torch.cat([o["logits"] for o in outputs])[..., : arch.vocab_size] if outputs else None
    hf_sd = megatron_to_hf_state_dict(gather_full_state_dict(chunks, arch), arch)
    return {"logits": logits, "hf_sd": hf_sd if rank == 0 else None}


def two_rank_suite(rank: int, world: int, hf_dir: Path, vpp_hf_dir: Path, ids: torch.Tensor, vp_args: tuple) -> dict:
    """All 2-rank checks in one spawn (each spawn costs ~10 s of imports)."""
    out = {"vp": vocab_parallel_worker(rank, world, *vp_args)}
    out["tp"] = tp_model_worker(rank, world, hf_dir, ids)
    out["pp"] = pp_model_worker(rank, world, hf_dir, ids)
    out["vpp"] = pp_model_worker(rank, world, vpp_hf_dir, ids, vpp=2)
    return out


def failing_on_rank_one(rank: int, world: int, message: str) -> int:
    """Returns its rank, except on rank 1 where it raises (spawn error propagation)."""
    if rank == 1:
        raise ValueError(message)
    return rank
