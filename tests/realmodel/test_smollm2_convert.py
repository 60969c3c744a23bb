"""SmolLM2-135M-Instruct through `camopd convert`: HF -> checkpoint -> HF is bit-exact, and the checkpoint's
Megatron logits on a ChatML prompt equal transformers' at TP=1 and at TP=3 (9 heads, 3 KV groups: 3 heads and one
KV group per rank), on 1 and 3 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.hf_mapping import read_hf_state_dict
from megatron_camopd.backend.spawn import run_on_ranks
from megatron_camopd.convert.main import convert_main

from ._workers import tp_logits_worker

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(600)]


def test_smollm2_round_trip_is_bit_exact(smollm2_dir, smollm2_ckpt, tmp_path) -> None:
    out = tmp_path / "hf"
    assert convert_main(["--to-hf", str(smollm2_ckpt), str(out)]) == 0
    a, b = read_hf_state_dict(smollm2_dir), read_hf_state_dict(out)
    assert len(a) == 272 and sorted(a) == sorted(b)  # tied embeddings: no lm_head either side
    assert "lm_head.weight" not in b and a["model.embed_tokens.weight"].shape == (49152, 576)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors changed, e.g. {differ[:3]}"
    for name in ("tokenizer.json", "chat_template.jinja"):  # the tokenizer and its ChatML template travel along
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()


@pytest.mark.multiproc
def test_smollm2_megatron_logits_equal_transformers_at_tp1_and_tp3(smollm2_dir, smollm2_ckpt, chat_ids) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([chat_ids])).logits.float()
    assert ref.shape == (1, len(chat_ids), 49152) and len(chat_ids) > 20
    (tp1,) = run_on_ranks(tp_logits_worker, 1, str(smollm2_ckpt), chat_ids)
    tp3 = run_on_ranks(tp_logits_worker, 3, str(smollm2_ckpt), chat_ids)
    assert (tp1["heads_per_rank"], tp1["kv_groups_per_rank"]) == (9, 3)
    assert all((r["heads_per_rank"], r["kv_groups_per_rank"]) == (3, 1) for r in tp3)
    diffs = {"tp1": (tp1["logits"] - ref).abs().max().item(), "tp3": (tp3[0]["logits"] - ref).abs().max().item()}
    print(f"SmolLM2 logits max |megatron - transformers|: TP=1 {diffs['tp1']:.3g}, TP=3 {diffs['tp3']:.3g}")
    assert diffs["tp1"] < 1e-4 and diffs["tp3"] < 1e-4, diffs
    for r in tp3[1:]:  # every TP rank ends with the same gathered logits
        assert torch.equal(r["logits"], tp3[0]["logits"])
    assert torch.equal(tp1["logits"].argmax(-1), ref.argmax(-1))
