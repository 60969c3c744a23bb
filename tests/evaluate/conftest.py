"""Fixtures of the evaluation tests: a tiny random Qwen3 HF model with a tiny tokenizer, loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3Config

    from megatron_camopd.data.tokenizer import Tokenizer, make_tiny_tokenizer

    out = tmp_path_factory.mktemp("eval_hf") / "qwen3"
    make_tiny_tokenizer(out)
    torch.manual_seed(3)
    cfg = Qwen3Config(
        vocab_size=Tokenizer.from_dir(out).vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from megatron_camopd.evaluate.main import load_hf_model

    return load_hf_model(tiny_model_dir)
