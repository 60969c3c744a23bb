"""A checkpoint re-saved at TP=2, then PP=2 (2 gloo ranks) converts back to an HF model that transformers loads and
generates with, and whose logits equal the TP=2 Megatron model's and the original HF model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_camopd.backend.hf_mapping import read_hf_state_dict
from megatron_camopd.backend.spawn import run_on_ranks
from megatron_camopd.convert.main import convert_main
from megatron_camopd.convert.megatron_hf import checkpoint_tensor_meta
from tests.helpers import hf_logits

from ._workers import tp2_resave_worker
from .conftest import IDS

KINDS = ("qwen3", "qwen3_tied")


@pytest.fixture(scope="module")
def tp2(tiny_hf, tmp_path_factory) -> dict:
    """HF -> --from-hf (TP=1) -> loaded and re-saved at TP=2 -> --to-hf, for tied and untied Qwen3."""
    root = tmp_path_factory.mktemp("tp2")
    pairs = []
    for kind in KINDS:
        convert_main(["--from-hf", str(tiny_hf[kind]), str(root / f"{kind}_tp1")])
        pairs.append((root / f"{kind}_tp1", root / f"{kind}_tp2"))
    ranks = run_on_ranks(tp2_resave_worker, 2, pairs, IDS)
    for kind in KINDS:
        convert_main(["--to-hf", str(root / f"{kind}_tp2"), str(root / f"{kind}_hf")])
        convert_main(["--to-hf", str(root / f"{kind}_tp2_pp"), str(root / f"{kind}_pp_hf")])
    return {"root": root, "ranks": ranks}


@pytest.mark.multiproc
@pytest.mark.parametrize("kind", KINDS)
def test_tp2_checkpoint_to_hf_matches_megatron_and_original(tp2, tiny_hf, kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root: Path = tp2["root"]
    out = root / f"{kind}_hf"
    megatron = tp2["ranks"][0][str(root / f"{kind}_tp2")]
    torch.testing.assert_close(tp2["ranks"][1][str(root / f"{kind}_tp2")], megatron)  # both TP ranks agree
    saved = checkpoint_tensor_meta(root / f"{kind}_tp2" / "iter_0000004")
    assert saved["embedding.word_embeddings.weight"].global_shape == (256, 64)  # TP=2 padding, not TP=1's 128
    converted = hf_logits(out, IDS)
    assert (converted - megatron).abs().max().item() < 1e-4
    assert (converted - hf_logits(tiny_hf[kind], IDS)).abs().max().item() < 1e-4
    a = read_hf_state_dict(tiny_hf[kind])
    for path in (out, root / f"{kind}_pp_hf"):  # TP=2 and then PP=2 resharding are lossless
        b = read_hf_state_dict(path)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2="}], add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf[kind], dtype=torch.float32).eval()
    assert gen.shape[1] > enc["input_ids"].shape[1]
    assert torch.equal(gen, ref.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id))
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1] :]), str)
