"""The unbiased pass@k estimator against hand-computed values and the closed form with binomials."""

from __future__ import annotations

import math

import pytest

from megatron_camopd.evaluate.core import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 0, 1, 0.0),  # nothing correct
        (5, 5, 3, 1.0),  # everything correct
        (5, 1, 1, 0.2),  # pass@1 is the fraction correct
        (10, 3, 1, 0.3),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 3, 2, 1.0),  # n - c < k: every k-subset holds a correct sample
        (6, 2, 3, 0.8),  # 1 - C(4,3)/C(6,3) = 1 - 4/20
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_cases(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_binomial_form_and_is_monotone_in_k() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            for k, v in enumerate(values, start=1):
                assert v == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
            assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n stays finite and exact


def test_mean_pass_at_k_and_invalid_arguments() -> None:
    assert mean_pass_at_k([0, 2, 4], n=4, k=1) == pytest.approx((0 + 0.5 + 1) / 3)
    assert mean_pass_at_k([], n=4, k=1) == 0.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
