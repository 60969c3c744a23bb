"""A method added the way a new one is: one class, registered; nothing else in the package changes.

`half_gap` is OPD with every advantage halved (A = clip(delta) / 2), so on the first step (same rollouts, same
weights) its loss and gradient norm are exactly half of OPD's: scaling by a power of two rounds nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron_camopd.algo.methods import Method, register_method


@register_method
@dataclass
class HalfGap(Method):
    """Test method: single-teacher OPD with halved advantages."""

    name: ClassVar[str] = "half_gap"
    loss_forms: ClassVar[tuple[str, ...]] = ("pg",)

    def _signals(self, batch, p):
        adv, token_weight, keep, scale = super()._signals(batch, p)
        return adv * 0.5, token_weight, keep, scale


def train_both(rank: int, world: int, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Each run of the tiny spec in this (spawned) process, where importing this module registered half_gap."""
    from ._workers import run_methods

    return run_methods(rank, world, runs)
