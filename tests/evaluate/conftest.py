"""Fixtures of the evaluation tests: a tiny random Qwen3 HF model with a tiny tokenizer, loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_hf_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from megatron_camopd.data.tokenizer import Tokenizer, make_tiny_tokenizer

    out = tmp_path_factory.mktemp("eval_hf") / "qwen3"
    make_tiny_tokenizer(out)
    vocab = Tokenizer.from_dir(out).vocab_size
    return tiny_hf_model(out, vocab_size=vocab, seed=3, max_position_embeddings=512, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from megatron_camopd.evaluate.core import load_hf_model

    return load_hf_model(tiny_model_dir)
