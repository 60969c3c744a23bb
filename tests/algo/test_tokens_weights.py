"""Masked per-token helpers and importance-sampling weights."""

import math

import pytest
import torch

from megatron_camopd.algo.tokens import masked_seq_mean, nonfinite_rows, seq_lengths, token_gaps
from megatron_camopd.algo.weights import is_weights
from megatron_camopd.errors import SpecError


def test_masked_seq_mean_ignores_padding_and_empty_rows_are_zero():
    x = torch.tensor([[1.0, 3.0, float("nan")], [2.0, 4.0, 6.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert masked_seq_mean(x, mask).tolist() == [2.0, 4.0, 0.0]
    assert seq_lengths(mask).tolist() == [2, 3, 0]


def test_token_gaps_zero_on_padding():
    t = torch.tensor([[-1.0, -2.0, float("inf")]])
    s = torch.tensor([[-1.5, -1.0, 0.0]])
    assert token_gaps(t, s, torch.tensor([[1, 1, 0]])).tolist() == [[0.5, -1.0, 0.0]]


def test_nonfinite_rows_only_counts_response_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    a = torch.tensor([[0.0, 0.0, float("nan")], [0.0, float("nan"), 0.0], [0.0, float("-inf"), 0.0]])
    k = torch.zeros(3, 3, 2)
    k[1, 0, 1] = float("nan")
    assert nonfinite_rows(mask, a).tolist() == [False, False, True]
    assert nonfinite_rows(mask, a, k).tolist() == [False, True, True]
    assert nonfinite_rows(mask, torch.tensor([0.0, float("nan"), 1.0])).tolist() == [False, True, False]


def test_is_weights_mask_truncate_none():
    rollout = torch.zeros(1, 5)
    ratios = torch.tensor([[0.4, 0.5, 2.0, 5.0, 6.0]])
    train = ratios.log()
    mask = torch.ones(1, 5)
    w = is_weights(train, rollout, mask, "mask")
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 2.0, 5.0, 0.0]]))
    w = is_weights(train, rollout, mask, "truncate", cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.4, 0.5, 2.0, 2.0, 2.0]]))
    assert is_weights(train, rollout, mask, "none").tolist() == [[1.0] * 5]
    assert is_weights(train, None, mask, "mask").tolist() == [[1.0] * 5]


def test_is_weights_detached_zero_on_padding_and_nonfinite():
    train = torch.tensor([[0.1, float("nan"), 0.3]], requires_grad=True)
    rollout = torch.tensor([[0.0, 0.0, float("nan")]])
    w = is_weights(train, rollout, torch.tensor([[1, 1, 0]]), "mask")
    assert not w.requires_grad
    assert w[0, 0].item() == pytest.approx(math.exp(0.1))
    assert w[0, 1:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"mode": "clip"}, "is_weight"),
        ({"eps_low": 1.5}, "eps_low"),
        ({"eps_high": 0.5}, "eps_high"),
        ({"cap": 0.0}, "is_cap"),
    ],
)
def test_is_weights_rejects_bad_params(kw, field):
    with pytest.raises(SpecError, match=field):
        is_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), **kw)
