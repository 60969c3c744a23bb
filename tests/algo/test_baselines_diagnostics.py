"""Baseline token signals (Relaxed OPD, SelecTKD, ExOPD) and the diagnostics instruments."""

import math

import pytest
import torch

from megatron_camopd.algo.baselines import entropy_token_mask, exopd_advantage, relaxed_reward, selectkd_weights
from megatron_camopd.algo.diagnostics import (
    coherence,
    coherence_gain,
    grad_dot_cosine,
    length_summary,
    selected_fraction,
    spearman,
)
from megatron_camopd.errors import SpecError


def test_relaxed_reward_floor():
    r = relaxed_reward(torch.tensor([-3.0, -1.0, 0.5]), lam=0.2)
    assert r.tolist() == pytest.approx([math.log(0.25), -1.0, 0.5])
    with pytest.raises(SpecError, match="lambda"):
        relaxed_reward(torch.zeros(1), lam=1.0)


def test_entropy_token_mask_top_beta_of_batch_response_tokens():
    ent = torch.tensor([[0.1, 0.9, 0.5], [0.7, 99.0, 0.2]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    out = entropy_token_mask(ent, mask, beta=0.5)  # 5 tokens -> ceil(2.5) = 3
    assert out.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert entropy_token_mask(ent, mask, beta=1.0).tolist() == mask.float().tolist()
    ties = entropy_token_mask(torch.ones(1, 4), torch.ones(1, 4), beta=0.5)
    assert ties.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_selectkd_weights_and_acceptance_rate():
    top1 = torch.tensor([[3, 7, 1], [2, 2, 0]])
    topk = torch.tensor([[[3, 4, 5], [1, 2, 7], [0, 9, 8]], [[2, 0, 0], [5, 6, 2], [0, 1, 1]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, rate = selectkd_weights(top1, topk, mask, k=2, beta=0.01)
    # accepted: (0,0) yes, (0,1) 7 not in first 2, (0,2) no, (1,0) yes, (1,1) 2 not in first 2
    assert torch.allclose(w, torch.tensor([[1.0, 0.01, 0.01], [1.0, 0.01, 0.0]]))
    assert rate == pytest.approx(2 / 5)
    w3, rate3 = selectkd_weights(top1, topk, mask, k=3, beta=0.0)
    assert w3.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]] and rate3 == pytest.approx(4 / 5)
    with pytest.raises(SpecError, match="selectkd_k"):
        selectkd_weights(top1, topk, mask, k=4)


def test_exopd_advantage_hand_and_lambda_one_is_plain_gap():
    t, s, r = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.tensor([[-2.0, -2.0]])
    mask = torch.tensor([[1, 0]])
    assert torch.allclose(exopd_advantage(t, s, r, mask, lam=1.25), torch.tensor([[1.25 * 1.0 - 0.5, 0.0]]))
    assert torch.allclose(exopd_advantage(t, s, r, mask, lam=1.0), torch.tensor([[0.5, 0.0]]))


def test_grad_dot_cosine():
    dot, cos = grad_dot_cosine(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([2.0, 1.0, 0.0]))
    assert dot == 2.0 and cos == pytest.approx(2.0 / (math.sqrt(5) * math.sqrt(5)))
    assert math.isnan(grad_dot_cosine(torch.zeros(2), torch.ones(2))[1])


def test_coherence_identical_opposite_orthogonal():
    g = torch.tensor([0.3, -1.0, 2.0])
    assert coherence([g, g, g]) == pytest.approx(1.0)
    assert coherence([g, -g]) == pytest.approx(0.0)
    assert coherence(torch.eye(2)) == pytest.approx(math.sqrt(2) / 2)
    assert coherence(torch.stack([g, 2 * g]).reshape(2, 1, 3)) == pytest.approx(1.0)
    assert math.isnan(coherence([])) and math.isnan(coherence([torch.zeros(3)]))


def test_coherence_gain_and_selected_fraction():
    assert coherence_gain(0.6, 0.5) == pytest.approx(20.0)
    assert math.isnan(coherence_gain(0.6, 0.0))
    assert selected_fraction(torch.tensor([True, False, True, True])) == 0.75


def test_spearman_hand_cases():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks (scipy.stats.spearmanr gives 0.9486832980505138)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1.0, float("nan"), 2.0, 3.0], [1.0, 5.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([float("nan"), 1.0], [1.0, 2.0]))


def test_length_summary_selected_vs_dropped():
    out = length_summary(torch.tensor([10, 20, 30, 40]), torch.tensor([True, False, True, False]))
    assert out["selected_len_mean"] == 20.0 and out["selected_len_median"] == 20.0
    assert out["dropped_len_min"] == 20.0 and out["dropped_len_max"] == 40.0
    empty = length_summary(torch.tensor([5]), torch.tensor([True]))
    assert math.isnan(empty["dropped_len_mean"]) and empty["selected_len_max"] == 5.0
