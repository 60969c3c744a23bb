"""Fixtures of the conversion tests: tiny HF models (Qwen3 untied/tied, Llama) that carry a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ._workers import make_tiny_hf_with_tokenizer

IDS = torch.tensor([[7, 19, 3, 55, 101, 12, 0, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]])


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert_hf")
    return {k: make_tiny_hf_with_tokenizer(k, root / k, seed=i) for i, k in enumerate(("qwen3", "qwen3_tied", "llama"))}
