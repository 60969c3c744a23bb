"""HF <-> Megatron weight mapping at TP=1: logits parity with transformers, bit-exact round trips, save_hf."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_camopd.backend.hf_mapping import (
    gather_full_state_dict,
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
    read_hf_state_dict,
    save_hf,
    tp_shard,
    tp_unshard,
)
from megatron_camopd.backend.vocab_parallel import vocab_parallel_logprobs
from megatron_camopd.errors import CheckpointError
from tests.helpers import hf_logits

from ._workers import build_loaded


@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied", "llama"])
def test_logits_match_transformers_and_round_trip(megatron_world, tiny_hf_dirs, name: str) -> None:
    hf_dir = tiny_hf_dirs[name]
    arch, chunks = build_loaded(hf_dir, tp=1, pp=1)
    ids = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(hf_dir, ids)
    with torch.no_grad():
        out = chunks[0](ids, torch.arange(17).expand(2, -1), attention_mask=None)
    assert (out[..., : arch.vocab_size] - ref).abs().max().item() < 1e-4
    lp = vocab_parallel_logprobs(out, ids, None, vocab_size=arch.vocab_size)
    ref_lp = torch.log_softmax(ref, -1).gather(-1, ids.unsqueeze(-1))[..., 0]
    assert (lp - ref_lp).abs().max().item() < 1e-4

    original = read_hf_state_dict(hf_dir)
    back = megatron_to_hf_state_dict(gather_full_state_dict(chunks, arch), arch)
    if arch.tie_word_embeddings:
        assert "lm_head.weight" not in original and back["lm_head.weight"] is back["model.embed_tokens.weight"]
        back.pop("lm_head.weight")
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_save_hf_sharded_reloads_in_transformers(megatron_world, tiny_hf_dirs, tmp_path) -> None:
    src = tiny_hf_dirs["qwen3_tied"]
    hf_sd = read_hf_state_dict(src)
    hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    (src / "tokenizer_config.json").write_text("{}")
    config = json.loads((src / "config.json").read_text())
    out = save_hf(tmp_path / "out", hf_sd, config, tokenizer_dir=src, max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    assert (out / "tokenizer_config.json").is_file()
    ids = torch.randint(0, 300, (1, 9))
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(src, ids), atol=0, rtol=0)
    _, chunks = build_loaded(out, tp=1, pp=1)  # reads the sharded checkpoint through its index
    with torch.no_grad():
        logits = chunks[0](ids, torch.arange(9).unsqueeze(0), attention_mask=None)[..., :300]
    assert (logits - hf_logits(src, ids)).abs().max().item() < 1e-4


def test_tp_shard_unshard_inverse_and_missing_tensor(tiny_hf_dirs) -> None:
    from megatron_camopd.backend.model import ModelArch

    arch = ModelArch.from_hf_dir(tiny_hf_dirs["llama"])
    full = hf_to_megatron_state_dict(read_hf_state_dict(tiny_hf_dirs["llama"]), arch, arch.padded_vocab_size(2))
    for key, value in full.items():
        shards = [tp_shard(key, value, r, 2) for r in range(2)]
        assert torch.equal(tp_unshard(key, shards), value), key
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]  # rank 0 holds [gate_0; up_0]
    assert torch.equal(tp_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 0, 2)[48:], fc1[96:144])
    broken = read_hf_state_dict(tiny_hf_dirs["llama"])
    broken.pop("model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.weight"):
        hf_to_megatron_state_dict(broken, arch, 384)
