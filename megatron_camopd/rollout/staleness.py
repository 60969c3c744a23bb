"""Stale rollouts: a served rollout, and every rollout of the overlapped pipeline (`rollout/pipeline.py`), carries
the weight version it was sampled with (`meta["weight_version"]`, the optimizer step the weights came from); the
trainer's version is the step being trained.

A lag of at most `rollout.max_staleness` steps is used (the importance weight already corrects with the
rollout log-probs) and counted (`stale_samples`). Beyond it, `on_stale: error` stops the run naming the sample and
the server, `on_stale: drop` keeps the sample in the batch without teacher scores -- dropped from the loss and
counted (`stale_dropped`, and like a NaN drop in `n_nan_dropped`), never silently lost. A version that is not a
step number (e.g. a server still on its launch weights, "default") is beyond any bound. Rollouts without a
version (in-process engines generating between steps) are never stale. `staleness_metrics` gives every step's
`rollout_staleness_max` / `rollout_staleness_mean` over the batch.
"""

from __future__ import annotations

from megatron_camopd.errors import RolloutError
from megatron_camopd.rollout.sglang_protocol import version_lag

STALE_KEY = "stale_drop"  # Sample.meta key of a dropped stale sample (its reason)


def lag_of(rollout, trainer_version: int) -> int | None:
    """Steps behind the trainer (0 = current); None when the rollout is not versioned; a version that is not a
    step number counts as infinitely stale."""
    if "weight_version" not in rollout.meta:
        return None
    lag = version_lag(rollout.meta["weight_version"], trainer_version)
    return 1 << 30 if lag is None else lag


def stale_reason(index: int, rollout, trainer_version: int, max_staleness: int) -> str | None:
    """Why sample `index` is too stale to train on, or None."""
    lag = lag_of(rollout, trainer_version)
    if lag is None or lag <= max_staleness:
        return None
    return (
        f"stale rollout: sample {index} from {rollout.meta.get('server')} has weight_version "
        f"{rollout.meta.get('weight_version')!r}, the trainer is at step {trainer_version} "
        f"(rollout.max_staleness = {max_staleness})"
    )


def fail_if_stale(samples, trainer_version: int, max_staleness: int) -> None:
    """`on_stale: error`: stop at the first sample beyond the bound (checked on the gathered batch, so every rank
    agrees)."""
    for s in samples:
        if s.rollout is not None and (why := stale_reason(s.index, s.rollout, trainer_version, max_staleness)):
            raise RolloutError(why + "; set rollout.on_stale: drop to drop such samples instead")


def stale_counts(samples) -> dict[str, float]:
    """Metrics of a step with versioned rollouts (`Sample.meta["stale_lag"]`, set by collect_step): used samples
    behind the trainer, and samples dropped for being too stale."""
    lags = [s.meta["stale_lag"] for s in samples if "stale_lag" in s.meta]
    if not lags:
        return {}
    return {
        "stale_samples": float(sum(1 for s in samples if s.meta.get("stale_lag") and STALE_KEY not in s.meta)),
        "stale_dropped": float(sum(1 for s in samples if STALE_KEY in s.meta)),
    }


def staleness_metrics(samples, trainer_version: int) -> dict[str, float]:
    """`rollout_staleness_max` / `_mean`: versions each sample's weights lag the trainer's (unversioned rollouts,
    sampled by the trainer's own current weights, lag 0; a version that is not a step number counts as 2**30)."""
    lags = [lag_of(s.rollout, trainer_version) or 0 for s in samples if s.rollout is not None]
    if not lags:
        return {}
    return {"rollout_staleness_max": float(max(lags)), "rollout_staleness_mean": float(sum(lags) / len(lags))}
