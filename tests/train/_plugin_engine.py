"""A rollout engine added the way a new one is: one sampler class and one registry entry; nothing else in the
package changes.

`counting_reference` is the reference engine (rollout/reference.py) that also counts the prompts it sampled and
stamps its own name on each rollout: the same tokens and log-probs for the same seeds, so a run on it trains
exactly the curve of a run on `reference`, and the count shows the run sampled through it.
"""

from __future__ import annotations

from megatron_camopd.engines import register_engine
from megatron_camopd.rollout.reference import ReferenceSampler

SAMPLED: list[int] = []  # prompts per `generate` call, in this process


class CountingReference(ReferenceSampler):
    """Test engine: the reference engine, counting what it samples."""

    engine = "counting_reference"

    def generate(self, prompts, params, seeds, on_finish=None):
        SAMPLED.append(len(prompts))
        return super().generate(prompts, params, seeds, on_finish)


register_engine(
    "counting_reference",
    f"{__name__}:CountingReference",
    served=False,
    summary="test engine: the reference engine, counting the prompts it samples",
)


def train_each(rank: int, world: int, runs: dict[str, list[str]]) -> dict[str, tuple[list[dict], list[int]]]:
    """Each run of the tiny spec in this (spawned) process, where importing this module registered the engine:
    its metrics rows and the prompts `counting_reference` sampled during it."""
    from ._workers import run_train

    out = {}
    for name, overrides in runs.items():
        SAMPLED.clear()
        rows = run_train(rank, world, overrides)
        out[name] = (rows or [], list(SAMPLED))
    return out
