"""Shared fixtures for the backend tests: a 1-rank gloo world in the pytest process and tiny HF models."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._workers import make_tiny_hf


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world 1) + megatron parallel_state at TP=PP=1, on the CPU runtime."""
    from megatron_camopd.backend.cpu_runtime import init_distributed

    init_distributed(1, 1)
    yield


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random HF checkpoints: qwen3 untied/tied (head_dim != hidden/heads) llama untied, 4-layer tied llama."""
    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_hf(name, root / name) for name in ("qwen3", "qwen3_tied", "llama", "llama_tied4")}
