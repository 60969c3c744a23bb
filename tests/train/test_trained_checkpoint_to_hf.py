"""A checkpoint written by `camopd train` (at TP=2) converts to HuggingFace, loads with transformers'
AutoModelForCausalLM/AutoTokenizer, generates, and gives the Megatron model's logits."""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.spawn import run_on_ranks
from tests.helpers import run_cli

from ._workers import megatron_logits, run_train, tiny_overrides


@pytest.mark.multiproc
def test_trained_checkpoint_converts_and_matches_logits(tiny_root, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_on_ranks(run_train, 2, tiny_overrides(tiny_root, ckpt, "train.steps=1", "parallel.tp=2"))
    hf = tmp_path / "hf"
    res = run_cli("convert", "--to-hf", str(ckpt), str(hf), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "12+30="}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits.float()
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(ids) + 5 or int(out[0, -1]) == tok.eos_token_id
    mg = run_on_ranks(megatron_logits, 1, str(ckpt), ids)[0]
    assert (hf_logits - mg).abs().max() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny_root / "student", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(torch.tensor([ids])).logits - hf_logits).abs().max() > 1e-4  # the trained weights, not the init
