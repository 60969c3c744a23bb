"""Uni-OPD: margins, margin shift, greedy margin mask, online and offline balancing."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_camopd.algo.uniopd import (
    balance_correctness,
    greedy_margin_mask,
    group_margins,
    margin_shift,
    offline_difficulty_balance,
    trajectory_returns,
)
from megatron_camopd.errors import SpecError

SETTINGS = settings(max_examples=60, deadline=None)


def test_margins_hand_case_and_undefined_groups():
    g = torch.tensor([1.0, 0.5, 0.2, 0.6, 3.0, 2.0])
    reward = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    gm = group_margins(g, reward, group, "mean")
    assert gm.group_ids.tolist() == [0, 1]
    assert gm.margin[0].item() == pytest.approx(0.75 - 0.4) and torch.isnan(gm.margin[1])
    assert group_margins(g, reward, group, "minmax").margin[0].item() == pytest.approx(0.5 - 0.6)
    glob = group_margins(g, reward, group, "mean", scope="global")
    assert glob.margin.tolist() == pytest.approx([(1 + 0.5 + 3 + 2) / 4 - 0.4])


@st.composite
def group_batch(draw):
    n_pos, n_neg = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    n_groups = draw(st.integers(1, 3))
    t = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b = (n_pos + n_neg) * n_groups
    if b == 0:
        n_pos, b = 1, n_groups
    reward = torch.tensor(([1.0] * n_pos + [0.0] * (b // n_groups - n_pos)) * n_groups)
    group = torch.arange(n_groups).repeat_interleave(b // n_groups)
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[:, 0] = True
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    return rewards, mask, reward, group


@SETTINGS
@given(
    group_batch(),
    st.sampled_from(["lift", "suppress", "spread"]),
    st.sampled_from(["mean", "minmax"]),
    st.sampled_from(["group", "global"]),
    st.floats(-0.5, 2.0),
)
def test_margin_shift_reaches_target_and_keeps_order(batch, direction, mode, scope, target):
    rewards, mask, reward, group = batch
    res = margin_shift(rewards, mask, reward, group, target, direction, mode, scope)
    g0, g1 = trajectory_returns(rewards, mask), trajectory_returns(res.token_rewards, mask)
    before = group_margins(g0, reward, group, mode, scope)
    after = group_margins(g1, reward, group, mode, scope)
    for m0, m1 in zip(before.margin.tolist(), after.margin.tolist()):
        if math.isnan(m0):
            assert math.isnan(m1)
        elif m0 < target:
            assert m1 == pytest.approx(target, abs=1e-9)
        else:
            assert m1 == pytest.approx(m0, abs=1e-12)
    for side in (reward > 0.5, reward <= 0.5):
        for gid in group.unique():
            rows = side & (group == gid)
            assert torch.equal(torch.argsort(g0[rows], stable=True), torch.argsort(g1[rows], stable=True))
    assert torch.equal(res.token_rewards[~mask], rewards[~mask])


def test_margin_shift_spread_hand_case():
    rewards = torch.tensor([[0.0, 0.0], [0.2, 0.2], [0.3, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    res = margin_shift(rewards, mask, torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3, dtype=torch.long), 0.4)
    # m = 0 - 0.25 = -0.25, Delta = 0.65: S+ +0.325, S- -0.325 on response tokens only
    assert res.shift.tolist() == pytest.approx([0.65])
    expected = torch.tensor([[0.325, 0.325], [-0.125, -0.125], [-0.025, 0.0]])
    assert torch.allclose(res.token_rewards, expected)


def test_greedy_margin_mask_hand_case():
    g = torch.tensor([1.0, 0.0, 0.5])
    reward = torch.tensor([1.0, 1.0, 0.0])
    keep = greedy_margin_mask(g, reward, torch.zeros(3, dtype=torch.long), target=0.4)
    assert keep.tolist() == [True, False, True]  # dropping the worst positive gives margin 0.5
    g = torch.tensor([1.0, 0.75, 0.75, 0.5, 1.5, 0.25, 0.25, 0.25], dtype=torch.float64)
    reward = torch.tensor([1.0] * 4 + [0.0] * 4)
    keep = greedy_margin_mask(g, reward, torch.zeros(8, dtype=torch.long), target=0.6)
    # m = 0.75 - 0.5625: drop the best negative 1.5 (m = 0.5), then the worst positive 0.5 (m = 0.583),
    # then the first of the tied 0.75 positives (m = 0.625 >= 0.6); dropping a 0.25 negative never helps
    assert keep.tolist() == [True, False, True, False, False, True, True, True]


@SETTINGS
@given(group_batch(), st.sampled_from(["mean", "minmax"]), st.floats(0.0, 3.0), st.floats(0.0, 1.0))
def test_greedy_mask_respects_min_side_and_drops_fronts(batch, mode, target, min_frac):
    rewards, mask, reward, group = batch
    g = trajectory_returns(rewards, mask)
    keep = greedy_margin_mask(g, reward, group, target, mode, min_frac)
    for gid in group.unique():
        in_g = group == gid
        pos, neg = in_g & (reward > 0.5), in_g & (reward <= 0.5)
        if pos.sum() == 0 or neg.sum() == 0:
            assert keep[in_g].all()
            continue
        for side, worst_first in ((pos, False), (neg, True)):
            n = int(side.sum())
            assert int((keep & side).sum()) >= max(1, int(min_frac * n))
            dropped, kept = g[side & ~keep], g[side & keep]
            if dropped.numel():
                assert (dropped.min() >= kept.max()) if worst_first else (dropped.max() <= kept.min())


def test_balance_correctness_subsamples_majority_only():
    reward = torch.tensor([1.0] * 6 + [0.0] * 2 + [1.0] * 3 + [0.0] * 1 + [0.0] * 2)
    group = torch.tensor([0] * 8 + [1] * 4 + [2] * 2)
    keep = balance_correctness(reward, group, 1.0, torch.Generator().manual_seed(0))
    assert int(keep[:6].sum()) == 2 and keep[6:8].all()
    assert int(keep[8:11].sum()) == 1 and keep[11]
    assert keep[12:].all()  # all-incorrect group left as is
    again = balance_correctness(reward, group, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    keep2 = balance_correctness(reward, group, 2.0, torch.Generator().manual_seed(1))
    assert int(keep2[:6].sum()) == 4 and int(keep2[8:11].sum()) == 2
    with pytest.raises(SpecError, match="balance_ratio"):
        balance_correctness(reward, group, 0.0)


def test_offline_difficulty_balance_u_and_mirrored_j():
    counts = [0, 8, 4, 1, 8, 7]
    u = offline_difficulty_balance(counts, 8, "u", factor=2)
    assert u.indices == [0, 1, 2, 2, 3, 3, 4, 5, 5]
    assert u.hist_before == [1, 1, 0, 0, 1, 0, 0, 1, 2]
    assert u.hist_after == [1, 2, 0, 0, 2, 0, 0, 2, 2]
    j = offline_difficulty_balance(counts, 8, "mirrored_j", factor=3)
    assert j.indices == [0, 0, 0, 1, 2, 2, 2, 3, 3, 3, 4, 5, 5, 5]
    custom = offline_difficulty_balance(counts, 8, "u", low=4, high=4, factor=2)
    assert custom.indices == [0, 1, 2, 2, 3, 4, 5]
    with pytest.raises(SpecError, match="pass_counts"):
        offline_difficulty_balance([9], 8)
    with pytest.raises(SpecError, match="factor"):
        offline_difficulty_balance([1], 8, factor=0)
