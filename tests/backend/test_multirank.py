"""Two gloo ranks (one spawn for all checks): vocab-parallel maths at TP=2, a TP=2 and a PP=2 GPTModel
loaded from HF weights against transformers, and the TP/PP gather back to HF weights."""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.hf_mapping import read_hf_state_dict
from megatron_camopd.backend.spawn import run_on_ranks
from tests.helpers import hf_logits

from ._workers import VOCAB, two_rank_suite

pytestmark = pytest.mark.multiproc
V_PAD = 512


@pytest.fixture(scope="module")
def suite(tiny_hf_dirs):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, V_PAD, generator=g) * 3
    logits[..., VOCAB:] = 40.0  # padding must be ignored
    ids = torch.randint(0, VOCAB, (2, 5), generator=g)
    topk_ids = torch.randint(0, VOCAB, (2, 5, 3), generator=g)
    grad_lp, grad_at = torch.randn(2, 5, generator=g), torch.randn(2, 5, 3, generator=g)
    vp_args = (logits, ids, topk_ids, grad_lp, grad_at, VOCAB)
    model_ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    hf_dir = tiny_hf_dirs["qwen3"]
    results = run_on_ranks(two_rank_suite, 2, hf_dir, tiny_hf_dirs["llama_tied4"], model_ids, vp_args)
    return {
        "results": results,
        "vp_args": vp_args,
        "ids": model_ids,
        "hf_dir": hf_dir,
        "vpp_hf_dir": tiny_hf_dirs["llama_tied4"],
    }


def test_tp2_vocab_parallel_values_and_gradients(suite) -> None:
    logits, ids, topk_ids, grad_lp, grad_at, vocab = suite["vp_args"]
    r0, r1 = (r["vp"] for r in suite["results"])
    x = logits.double().clone().requires_grad_(True)
    ref = torch.log_softmax(x[..., :vocab], -1)
    ref_lp = ref.gather(-1, ids.unsqueeze(-1))[..., 0]
    ref_at = ref.gather(-1, topk_ids)
    ((ref_lp * grad_lp).sum() + (ref_at * grad_at).sum()).backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["lp"].double(), ref_lp.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(r["at"].double(), ref_at.detach(), atol=1e-5, rtol=0)
        p = ref.detach().exp()
        torch.testing.assert_close(r["entropy"].double(), -(p * ref.detach()).sum(-1), atol=1e-5, rtol=0)
        ref_vals, ref_ids = torch.topk(ref.detach(), 4, -1)
        assert torch.equal(r["top_ids"], ref_ids) and torch.equal(r["argmax"], ref_ids[..., 0])
        torch.testing.assert_close(r["top_vals"].double(), ref_vals, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]], -1).double(), x.grad, atol=1e-6, rtol=0)


def test_tp2_model_matches_transformers_and_gathers_back(suite) -> None:
    ref = hf_logits(suite["hf_dir"], suite["ids"])
    r0, r1 = (r["tp"] for r in suite["results"])
    assert (r0["logits"] - ref).abs().max().item() < 1e-4
    assert torch.equal(r0["logits"], r1["logits"])
    targets = torch.roll(suite["ids"], -1, dims=1)
    ref_lp = torch.log_softmax(ref, -1).gather(-1, targets.unsqueeze(-1))[..., 0]
    assert (r0["lp"] - ref_lp).abs().max().item() < 1e-4
    original = read_hf_state_dict(suite["hf_dir"])
    assert set(r0["hf_sd"]) == set(original) and all(torch.equal(r0["hf_sd"][k], original[k]) for k in original)


def test_pp2_forward_matches_transformers(suite) -> None:
    ref = hf_logits(suite["hf_dir"], suite["ids"])
    first, last = (r["pp"] for r in suite["results"])
    assert first["logits"] is None
    assert (last["logits"] - ref).abs().max().item() < 1e-4
    original = read_hf_state_dict(suite["hf_dir"])
    assert all(torch.equal(first["hf_sd"][k], original[k]) for k in original)


def test_interleaved_pp2_vpp2_tied_forward_matches_transformers(suite) -> None:
    ref = hf_logits(suite["vpp_hf_dir"], suite["ids"])
    first, last = (r["vpp"] for r in suite["results"])
    assert first["logits"] is None
    assert (last["logits"] - ref).abs().max().item() < 1e-4
    original = read_hf_state_dict(suite["vpp_hf_dir"])
    back = first["hf_sd"]
    assert torch.equal(back.pop("lm_head.weight"), original["model.embed_tokens.weight"])
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
