"""ModelArch parsing, TransformerConfig / FP8 mapping and GPTModel construction on CPU."""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.model import (
    ModelArch,
    build_gpt_model,
    fp8_transformer_fields,
    transformer_config,
)
from megatron_camopd.errors import SpecError

QWEN3 = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "max_position_embeddings": 40960,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": None,
    "attention_bias": False,
}
LLAMA3 = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def test_parse_real_world_configs() -> None:
    q = ModelArch.from_hf_config(QWEN3)
    assert (q.head_dim, q.num_kv_heads, q.qk_layernorm, q.tie_word_embeddings) == (128, 8, True, True)
    assert q.rope_theta == 1e6 and q.llama3_rope_factor is None
    assert q.padded_vocab_size(1) == 151936 and q.padded_vocab_size(8) == 152576
    ll = ModelArch.from_hf_config(LLAMA3)
    assert (ll.head_dim, ll.qk_layernorm, ll.llama3_rope_factor) == (64, False, 32.0)
    # transformers >= 5 writes rope_parameters instead of rope_theta
    new_style = {k: v for k, v in QWEN3.items() if k not in ("rope_theta", "rope_scaling")}
    new_style["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert ModelArch.from_hf_config(new_style).rope_theta == 5e5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen3_moe"}, "model_type 'qwen3_moe' is not supported"),
        ({"num_experts": 64}, "mixture-of-experts"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 5}, "not a multiple"),
        ({"vocab_size": None}, "missing required field 'vocab_size'"),
    ],
)
def test_unsupported_architectures_raise_spec_error(change: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ModelArch.from_hf_config({**QWEN3, **change}, source="x/config.json")


def test_llama3_scaling_with_non_default_fixed_fields_is_rejected() -> None:
    bad = {**LLAMA3, "rope_scaling": {**LLAMA3["rope_scaling"], "original_max_position_embeddings": 4096}}
    with pytest.raises(SpecError, match="original_max_position_embeddings"):
        ModelArch.from_hf_config(bad)


def test_fp8_mapping_and_its_cpu_error() -> None:
    assert fp8_transformer_fields(None) == {} and fp8_transformer_fields({"enabled": False}) == {}
    with pytest.raises(SpecError, match="fp8.format"):
        fp8_transformer_fields({"enabled": True, "format": "e5m2"})
    with pytest.raises(SpecError, match="fp8.recipe"):
        fp8_transformer_fields({"enabled": True, "recipe": "mxfp4"})
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="CUDA"):
            fp8_transformer_fields({"enabled": True, "format": "e4m3", "recipe": "tensorwise"})
        with pytest.raises(SpecError, match="CUDA"):
            transformer_config(ModelArch.from_hf_config(QWEN3), fp8={"enabled": True})


def test_transformer_config_layout_checks() -> None:
    arch = ModelArch.from_hf_config(QWEN3)
    cfg = transformer_config(arch, tp=2, pp=2, vpp=7, dtype=torch.bfloat16, calculate_per_token_loss=True)
    assert (cfg.kv_channels, cfg.num_query_groups, cfg.qk_layernorm, cfg.bf16) == (128, 8, True, True)
    assert cfg.calculate_per_token_loss and cfg.virtual_pipeline_model_parallel_size == 7
    with pytest.raises(SpecError, match="num_hidden_layers=28 is not divisible"):
        transformer_config(arch, pp=3)
    with pytest.raises(SpecError, match="tp=3"):
        transformer_config(arch, tp=3)


def test_build_tiny_model_forward_backward(megatron_world, tiny_hf_dirs) -> None:
    arch = ModelArch.from_hf_dir(tiny_hf_dirs["qwen3_tied"])
    model = build_gpt_model(arch, transformer_config(arch))
    names = set(model.state_dict())
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in names
    assert "output_layer.weight" not in names  # tied embeddings: no separate output layer at PP=1
    device = model.embedding.word_embeddings.weight.device  # the model's device: CUDA on a GPU machine
    ids = torch.randint(0, arch.vocab_size, (2, 9), device=device)
    out = model(ids, torch.arange(9, device=device).expand(2, -1), attention_mask=None)
    assert out.shape == (2, 9, arch.padded_vocab_size(1)) and out.dtype == torch.float32
    out.sum().backward()
    assert model.embedding.word_embeddings.weight.grad is not None
