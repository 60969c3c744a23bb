"""Shared tiny setup for the training tests: tokenizer, tiny Qwen3 student/teachers and synthetic data."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    from megatron_camopd.demo.tiny import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))
