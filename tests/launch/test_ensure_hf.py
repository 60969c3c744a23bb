"""A teacher given as a camopd checkpoint is converted to HF once for SGLang; an HF directory is served as it is."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_camopd.convert.megatron_hf import hf_to_checkpoint
from megatron_camopd.launch.servers import CONVERTED_MARKER, ensure_hf, main
from tests.convert._workers import make_tiny_hf_with_tokenizer


def test_checkpoint_converted_once_and_hf_dir_kept(tmp_path: Path, capsys) -> None:
    hf = make_tiny_hf_with_tokenizer("qwen3", tmp_path / "hf")
    assert ensure_hf(str(hf), str(tmp_path / "unused")) == str(hf) and not (tmp_path / "unused").exists()
    ckpt = tmp_path / "ckpt"
    hf_to_checkpoint(hf, ckpt)
    out = tmp_path / "served" / "teacher"
    assert ensure_hf(str(ckpt), str(out)) == str(out)
    assert (out / "config.json").is_file() and json.loads((out / CONVERTED_MARKER).read_text())["source"]
    assert (
        json.loads((out / "config.json").read_text())["num_hidden_layers"]
        == json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    )
    stamp = (out / CONVERTED_MARKER).stat().st_mtime_ns
    assert main(["ensure-hf", str(ckpt), str(out)]) == 0  # the launchers' entry point: a no-op the second time
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / CONVERTED_MARKER).stat().st_mtime_ns == stamp
    assert not list(out.parent.glob("teacher.tmp-*"))
