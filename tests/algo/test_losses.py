"""Per-sequence PG and top-k losses, padding invariance, normalisation and the selected reduction."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_camopd.algo.losses import clip_advantage, pg_seq_loss, reduce_selected, topk_seq_loss
from megatron_camopd.errors import SpecError

SETTINGS = settings(max_examples=60, deadline=None)


def test_clip_advantage_two_sided_detached_and_optional():
    d = torch.tensor([-7.0, -1.0, 0.0, 2.0, 9.0], requires_grad=True)
    c = clip_advantage(d, 5.0)
    assert c.tolist() == [-5.0, -1.0, 0.0, 2.0, 5.0] and not c.requires_grad
    assert clip_advantage(d, None).tolist() == d.tolist()
    with pytest.raises(SpecError, match="a_max"):
        clip_advantage(d, 0.0)


def test_pg_seq_loss_hand_case():
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, 0.5, 100.0], [2.0, 0.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 0.5]])
    tw = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    loss = pg_seq_loss(lp, adv, mask)
    assert loss.tolist() == pytest.approx([1.0, 0.0])
    # token weight 0 keeps the T_i = 3 normalisation: -(0 + 0 + 0.5*-2*-0.5)/3
    loss = pg_seq_loss(lp, adv, mask, is_w=w, token_weight=tw)
    assert loss.tolist() == pytest.approx([-(-1.0 + 2 * 0.5 * -2.0) / 2, -(0.5 * -2.0 * -0.5) / 3])
    loss.sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([-0.5, -0.5, 0.0])  # -(w * tw * A) / T_i


@st.composite
def padded(draw, k=None):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    shape = (b, t) if k is None else (b, t, k)
    return g, mask, shape


@SETTINGS
@given(padded(), st.booleans())
def test_pg_padding_never_changes_loss_or_grad(data, nan_padding):
    g, mask, shape = data
    lp0 = torch.randn(shape, generator=g)
    adv, w = torch.randn(shape, generator=g), torch.rand(shape, generator=g)
    noise = torch.full(shape, float("nan")) if nan_padding else torch.randn(shape, generator=g) * 100
    out = []
    for variant in (False, True):
        lp = torch.where(mask | (not variant), lp0, noise).requires_grad_(True)
        a = torch.where(mask | (not variant), adv, noise)
        ww = torch.where(mask | (not variant), w, noise)
        loss = pg_seq_loss(lp, a, mask, is_w=ww, token_weight=ww)
        loss.sum().backward()
        out.append((loss.detach(), lp.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@SETTINGS
@given(padded(k=3), st.booleans())
def test_topk_padding_never_changes_loss_or_grad(data, with_corr):
    g, mask, shape = data
    s0 = torch.log_softmax(torch.randn(shape[:2] + (5,), generator=g), -1)[..., :3]
    t0 = torch.log_softmax(torch.randn(shape[:2] + (5,), generator=g), -1)[..., :3]
    m3 = mask.unsqueeze(-1).expand(shape)
    out = []
    for variant in (False, True):
        s = torch.where(m3 | (not variant), s0, torch.full(shape, float("nan"))).requires_grad_(True)
        t = torch.where(m3 | (not variant), t0, torch.randn(shape, generator=g))
        loss = topk_seq_loss(s, t, mask, with_correction=with_corr)
        loss.sum().backward()
        out.append((loss.detach(), s.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("length", [1, 3, 17])
def test_sequence_weight_independent_of_length(length):
    theta = torch.tensor(0.3, requires_grad=True)
    lp = theta * torch.ones(1, length)
    loss = pg_seq_loss(lp, torch.ones(1, length), torch.ones(1, length))
    loss.sum().backward()
    assert loss.item() == pytest.approx(-0.3) and theta.grad.item() == pytest.approx(-1.0)


def test_topk_zero_gradient_at_match_only_with_correction():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    ids = torch.topk(logits.detach(), 4, dim=-1).indices
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for corr, zero in ((True, True), (False, False)):
        s_lp = torch.log_softmax(logits, -1).gather(-1, ids)
        loss = topk_seq_loss(s_lp, s_lp.detach().clone(), mask, with_correction=corr).sum()
        (grad,) = torch.autograd.grad(loss, logits)
        assert (grad.abs().max().item() == 0.0) == zero
        if corr:
            assert loss.item() == 0.0
    # direct gradient wrt the top-k log-probs without correction is p_s / T
    s = torch.log(torch.tensor([[[0.5, 0.2]]])).requires_grad_(True)
    topk_seq_loss(s, s.detach(), torch.ones(1, 1), with_correction=False).sum().backward()
    assert s.grad.flatten().tolist() == pytest.approx([0.5, 0.2])


def test_topk_hand_value():
    s = torch.log(torch.tensor([[[0.5, 0.25]]]))
    t = torch.log(torch.tensor([[[0.25, 0.25]]]))
    val = 0.5 * torch.log(torch.tensor(2.0)).item() - 0.5 + 0.25
    assert topk_seq_loss(s, t, torch.ones(1, 1)).item() == pytest.approx(val)
    assert topk_seq_loss(s, t, torch.ones(1, 1), with_correction=False).item() == pytest.approx(val + 0.25)


def test_reduce_selected_sum_and_count_ignore_dropped_nan():
    seq = torch.tensor([1.0, float("nan"), 3.0, 4.0], requires_grad=True)
    loss_sum, count = reduce_selected(seq, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert loss_sum.item() == 4.0 and count.item() == 2 and count.dtype == torch.int
    loss_sum.backward()
    assert seq.grad.tolist() == [1.0, 0.0, 1.0, 0.0]
    empty_sum, empty_count = reduce_selected(seq.detach(), torch.zeros(4))
    assert empty_sum.item() == 0.0 and empty_count.item() == 0
