"""HF -> Megatron checkpoint -> HF in one process: bit-exact round trips, logit parity, clear mismatch errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_camopd.backend.hf_mapping import read_hf_state_dict
from megatron_camopd.cli import main as cli_main
from megatron_camopd.convert.main import convert_main
from megatron_camopd.errors import CheckpointError, SpecError
from tests.helpers import hf_logits

from .conftest import IDS


def _assert_bit_exact(a_dir: Path, b_dir: Path) -> None:
    a, b = read_hf_state_dict(a_dir), read_hf_state_dict(b_dir)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_tied", "llama"])
def test_hf_megatron_hf_round_trip_is_bit_exact(tiny_hf, tmp_path, kind: str) -> None:
    src = tiny_hf[kind]
    assert convert_main(["--from-hf", str(src), str(tmp_path / "ckpt")]) == 0
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text().strip() == "iter_0000000"
    assert (root / "hf" / "config.json").is_file() and (root / "hf" / "tokenizer.json").is_file()
    assert not (root / "iter_0000000" / "scheduler.pt").exists()  # model only
    assert convert_main(["--to-hf", str(root), str(tmp_path / "back")]) == 0
    back = tmp_path / "back"
    _assert_bit_exact(src, back)
    saved = read_hf_state_dict(back)
    assert ("lm_head.weight" in saved) == (kind != "qwen3_tied")
    assert saved["model.embed_tokens.weight"].shape[0] == json.loads((src / "config.json").read_text())["vocab_size"]
    if kind == "llama":  # one architecture end to end through transformers as well
        torch.testing.assert_close(hf_logits(back, IDS), hf_logits(src, IDS), rtol=0, atol=0)


def test_from_hf_into_checkpoint_of_another_architecture_is_refused(tiny_hf, tmp_path) -> None:
    root = tmp_path / "ckpt"
    convert_main(["--from-hf", str(tiny_hf["qwen3"]), str(root)])
    with pytest.raises(CheckpointError, match="another architecture.*model_type"):
        convert_main(["--from-hf", str(tiny_hf["llama"]), str(root)])
    convert_main(["--from-hf", str(tiny_hf["qwen3"]), str(root)])  # same architecture: allowed (overwrite)


def test_tokenizer_larger_than_model_vocab_is_a_spec_error(tiny_hf, tmp_path) -> None:
    src = tmp_path / "small_vocab"
    shutil.copytree(tiny_hf["qwen3"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="tokenizer has 102 tokens but the model's vocab_size is 64"):
        convert_main(["--from-hf", str(src), str(tmp_path / "ckpt")])
    assert not (tmp_path / "ckpt").exists()


def test_layout_that_does_not_fit_the_architecture_is_a_spec_error(tiny_hf, tmp_path) -> None:
    with pytest.raises(SpecError, match="tp=3 must divide num_attention_heads=4"):
        convert_main(["--from-hf", str(tiny_hf["qwen3"]), str(tmp_path / "ckpt"), "--tp", "3"])
    with pytest.raises(SpecError, match="not divisible by pp"):
        convert_main(["--from-hf", str(tiny_hf["qwen3"]), str(tmp_path / "ckpt"), "--pp", "4"])


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("intermediate_size", 96, "linear_fc1.weight' has shape"),
        ("num_hidden_layers", 1, "shape"),
        ("vocab_size", 200, r"embedding.word_embeddings.weight' has shape \(128, 64\), expected \(200\+padding"),
    ],
)
def test_to_hf_with_a_config_that_does_not_match_the_checkpoint(tiny_hf, tmp_path, field, value, match) -> None:
    root = tmp_path / "ckpt"
    convert_main(["--from-hf", str(tiny_hf["qwen3"]), str(root)])
    cfg = json.loads((root / "hf" / "config.json").read_text())
    cfg[field] = value
    (root / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        convert_main(["--to-hf", str(root), str(tmp_path / "back")])
    assert not (tmp_path / "back").exists()


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys) -> None:
    assert cli_main(["convert", "--to-hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camopd convert: error:") and "nothing" in err[0]


def test_bf16_export_and_megatron_logits_match_hf(tiny_hf, tmp_path) -> None:
    """--dtype bf16 casts on export; the converted fp32 checkpoint's Megatron logits equal transformers'."""
    from megatron_camopd.backend.checkpoint import load_model_only, resolve_checkpoint
    from megatron_camopd.backend.model import ModelArch, build_model_chunks, transformer_config
    from megatron_camopd.convert.megatron_hf import single_process_world

    src, root = tiny_hf["qwen3_tied"], tmp_path / "ckpt"
    convert_main(["--from-hf", str(src), str(root)])
    convert_main(["--to-hf", str(root), str(tmp_path / "bf16"), "--dtype", "bf16"])
    sd = read_hf_state_dict(tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    arch = ModelArch.from_hf_dir(root / "hf")
    with single_process_world():
        chunks = build_model_chunks(arch, transformer_config(arch), parallel_output=False)
        load_model_only(resolve_checkpoint(root), chunks)
        with torch.no_grad():
            pos = torch.arange(IDS.shape[1]).unsqueeze(0).expand_as(IDS)
            logits = chunks[0].eval()(IDS, pos, attention_mask=None)[..., : arch.vocab_size]
    assert (logits - hf_logits(src, IDS)).abs().max().item() < 1e-4
