"""The loss settings every method shares (`method.loss`, `method.a_max`, the IS weight's `method.is_weight`,
`eps_low`, `eps_high`, `is_cap`, and the top-k loss's width `method.topk`), checked here once.

A method's own parameters are one `Section` next to its maths (`camopd.py`, `uniopd.py`, `baselines.py`); a method
class derives from `LossParams` and from its parameters' section, and `methods.register_method` names the spec key
they are loaded from. The ranges are those of the IS weight (``weights.is_weights``, MOPD §3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from megatron_camopd.checks import Section, check, non_negative, positive


@dataclass
class LossParams(Section):
    """Loss form, two-sided advantage clip and training/inference importance weighting."""

    loss: Literal["pg", "topk"] = "pg"
    a_max: float | None = 5.0  # two-sided advantage clip; null = no clip
    is_weight: Literal["mask", "truncate", "none"] = "mask"
    eps_low: float = 0.5
    eps_high: float = 5.0
    is_cap: float = 2.0  # C of truncated IS
    topk: int = 16

    def validate(self) -> None:
        super().validate()
        positive(self, "a_max", "eps_high", "is_cap")
        non_negative(self, "eps_low", "topk")
        check(
            self.eps_low <= self.eps_high, "eps_low", f"must be <= eps_high ({self.eps_high!r}), got {self.eps_low!r}"
        )
        check(self.eps_low <= 1.0, "eps_low", f"must be <= 1 (the ratio of a matching token), got {self.eps_low!r}")
        check(self.eps_high >= 1.0, "eps_high", f"must be >= 1 (the ratio of a matching token), got {self.eps_high!r}")
        check(self.loss != "topk" or self.topk >= 1, "topk", f"the topk loss needs topk >= 1, got {self.topk!r}")


@dataclass
class MethodParams(Section):
    """Base of a method's own parameters (a dataclass next to its maths, registered with its method)."""

    def resolve(self, method: Any) -> None:
        """Fill the defaults that depend on the method the spec selects (the class `method.name` names)."""
