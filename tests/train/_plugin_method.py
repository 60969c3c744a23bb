"""A method added the way a new one is: one file with its parameters and its class, and a registry entry; nothing
else in the package changes.

`half_gap` is OPD with every advantage scaled by `method.half_gap.factor` (default 1/2: A = clip(delta) / 2), so
on the first step (same rollouts, same weights) its loss and gradient norm are exactly `factor` times OPD's when
the factor is a power of two: scaling by one rounds nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron_camopd.algo.methods import Method, register_method
from megatron_camopd.algo.params import MethodParams
from megatron_camopd.checks import positive


@dataclass
class HalfGapParams(MethodParams):
    """`method.half_gap`: the factor every advantage is scaled by."""

    factor: float = 0.5

    def validate(self) -> None:
        super().validate()
        positive(self, "factor")


@dataclass
class HalfGap(Method, HalfGapParams):
    """Test method: single-teacher OPD with scaled advantages."""

    name: ClassVar[str] = "half_gap"
    loss_forms: ClassVar[tuple[str, ...]] = ("pg",)

    def _signals(self, batch, p):
        adv, token_weight, keep, scale = super()._signals(batch, p)
        return adv * self.factor, token_weight, keep, scale


register_method(HalfGap, HalfGapParams)


def train_both(rank: int, world: int, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Each run of the tiny spec in this (spawned) process, where importing this module registered half_gap."""
    from ._workers import run_methods

    return run_methods(rank, world, runs)
