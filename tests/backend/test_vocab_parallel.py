"""Vocab-parallel maths at TP=1 (in process) against full-vocabulary log_softmax references."""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend import vocab_parallel as vp

V_TRUE, V_PAD = 300, 384


@pytest.fixture()
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, V_PAD, generator=g) * 3
    x[..., V_TRUE:] = 50.0  # padded columns with huge logits must be ignored
    return x


def _ref_logp(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x[..., :V_TRUE].double(), dim=-1)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_logprobs_values_and_grads_match_log_softmax(logits: torch.Tensor, chunk: int) -> None:
    ids = torch.randint(0, V_TRUE, logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    x = logits.clone().requires_grad_(True)
    lp = vp.vocab_parallel_logprobs(x, ids, None, chunk_size=chunk, vocab_size=V_TRUE)
    (lp * upstream).sum().backward()
    assert torch.equal(x.detach(), logits)  # the input logits are never modified
    xr = logits.double().clone().requires_grad_(True)
    ref = torch.log_softmax(xr[..., :V_TRUE], -1).gather(-1, ids.unsqueeze(-1))[..., 0]
    (ref * upstream.double()).sum().backward()
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=0)
    assert torch.all(x.grad[..., V_TRUE:] == 0)


def test_logprobs_at_topk_ids_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 8, (2, 3, 4), generator=g)
    ref = torch.log_softmax(x[..., :8], -1).gather(-1, ids)
    out = vp.vocab_parallel_logprobs_at(x, ids, None, chunk_size=2, vocab_size=8)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    # The forward computes in fp32; check the analytic backward against finite differences of that forward.
    assert torch.autograd.gradcheck(
        lambda t: vp.vocab_parallel_logprobs_at(t, ids, None, 2, 8).double(), (x,), eps=1e-3, atol=2e-3
    )


def test_bf16_logits_give_fp32_results_and_bf16_grads(logits: torch.Tensor) -> None:
    x = logits.bfloat16().requires_grad_(True)
    ids = torch.zeros(logits.shape[:-1], dtype=torch.long)
    lp = vp.vocab_parallel_logprobs(x, ids, None, chunk_size=5, vocab_size=V_TRUE)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double(), _ref_logp(x.detach().float())[..., 0], atol=1e-4, rtol=0)


def test_entropy_topk_argmax(logits: torch.Tensor) -> None:
    ref = _ref_logp(logits)
    ent = vp.vocab_parallel_entropy(logits, None, chunk_size=4, vocab_size=V_TRUE)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)
    vals, ids = vp.vocab_parallel_topk(logits, 5, None, chunk_size=2, vocab_size=V_TRUE)
    ref_vals, ref_ids = torch.topk(ref, 5, dim=-1)
    assert torch.equal(ids, ref_ids) and vals.shape == (3, 7, 5)
    torch.testing.assert_close(vals.double(), ref_vals, atol=1e-5, rtol=0)
    assert torch.equal(vp.vocab_parallel_argmax(logits, None, vocab_size=V_TRUE), ref_ids[..., 0])
