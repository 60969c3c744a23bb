"""An engine added in one file (tests/train/_plugin_engine.py: a sampler class and its registry entry) trains the
tiny spec end to end, on-policy and overlapped (`rollout.max_staleness: 1`), with exactly the loss curve of the
engine it wraps: validation, the session, the rollout pipeline and its snapshot sampler take it from the registry."""

from __future__ import annotations

import pytest

from megatron_camopd.backend.spawn import run_on_ranks
from megatron_camopd.config import load_spec

from ._workers import TINY_SPEC, tiny_overrides


def _train_each(rank: int, world: int, runs: dict[str, list[str]]):
    """In the spawned rank only: importing the plug-in registers `counting_reference` there, not in pytest."""
    from ._plugin_engine import train_each

    return train_each(rank, world, runs)


@pytest.mark.multiproc
def test_an_engine_registered_in_one_file_trains_from_a_spec(tiny_root, tmp_path):
    steps = ("train.steps=2",)
    runs = {
        f"{engine}_k{k}": tiny_overrides(
            tiny_root, tmp_path / f"{engine}_k{k}", f"rollout.engine={engine}", f"rollout.max_staleness={k}", *steps
        )
        for k in (0, 1)
        for engine in ("reference", "counting_reference")
    }
    res = run_on_ranks(_train_each, 1, runs)[0]
    spec = load_spec(TINY_SPEC, runs["reference_k0"])
    per_step = spec.rollout.prompts_per_step * (spec.rollout.n_samples or 1)
    for k in (0, 1):
        (ref, ref_sampled), (plug, sampled) = res[f"reference_k{k}"], res[f"counting_reference_k{k}"]
        assert ref_sampled == [] and sum(sampled) == 2 * per_step  # every rollout went through the plug-in
        assert len(plug) == len(ref) == 2
        for a, b in zip(ref, plug, strict=True):
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["loss"] != 0.0
