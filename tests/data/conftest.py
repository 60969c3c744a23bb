"""Shared fixtures of the data tests: one tiny char-level tokenizer built once per session."""

from pathlib import Path

import pytest

from megatron_camopd.data.tokenizer import Tokenizer, make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "char")


@pytest.fixture(scope="session")
def tiny_tok(tiny_tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tok_dir)
