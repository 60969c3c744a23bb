"""Statistics of a multi-seed comparison: mean ± std, paired differences with bootstrap confidence intervals,
and the per-run summary of the referee's instruments read from `metrics.jsonl`.

With a handful of seeds an interval is wide and says so; the percentile bootstrap (scipy.stats.bootstrap) of the
mean paired difference is used because it assumes no distribution, and a single seed gets no interval at all.
A paired difference is method minus baseline on the same seed (same teachers, same data order), so the
seed-to-seed variation shared by both methods cancels.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def finite(vals: Sequence) -> list[float]:
    return [float(v) for v in vals if v is not None and math.isfinite(float(v))]


def mean_std(vals: Sequence) -> tuple[float | None, float | None]:
    """(mean, sample std) of the finite values; std 0 for one value, (None, None) for none."""
    v = finite(vals)
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def paired_difference(method: Sequence, baseline: Sequence, *, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of method - baseline over paired seeds, its sample std, and a percentile-bootstrap CI of the mean
    (None with fewer than 2 pairs or when every difference is equal: the interval is then the point)."""
    pairs = [
        (a, b)
        for a, b in zip(method, baseline)
        if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
    ]
    d = np.array([float(a) - float(b) for a, b in pairs])
    out: dict = {
        "n": len(d),
        "mean": float(d.mean()) if len(d) else None,
        "std": float(d.std(ddof=1)) if len(d) > 1 else None,
        "per_seed": d.tolist(),
        "ci_low": None,
        "ci_high": None,
        "level": level,
    }
    if len(d) >= 2:
        if np.allclose(d, d[0]):
            out["ci_low"] = out["ci_high"] = float(d[0])
        else:
            from scipy.stats import bootstrap

            res = bootstrap(
                (d,),
                np.mean,
                confidence_level=level,
                n_resamples=BOOTSTRAP_RESAMPLES,
                method="percentile",
                random_state=np.random.default_rng(seed),
            )
            out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out


def verdict(diff: dict, what: str = "CaMOPD - MOPD") -> str:
    """A plain sentence on whether the interval excludes zero."""
    if diff["mean"] is None:
        return f"{what}: no paired seeds"
    if diff["ci_low"] is None:
        return f"{what}: {diff['mean']:+.3f} from one seed (no interval)"
    span = (
        f"{diff['mean']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] ({100 * diff['level']:.0f}% CI, "
        f"{diff['n']} seeds)"
    )
    if diff["ci_low"] > 0:
        return f"{what} = {span}: the interval lies above 0"
    if diff["ci_high"] < 0:
        return f"{what} = {span}: the interval lies below 0"
    return f"{what} = {span}: the interval contains 0 (no demonstrated difference)"


def instruments(rows: list[dict]) -> dict[str, float | None]:
    """The referee's instruments over one run's metrics rows: coherence of full candidate batches, cross-branch
    gradient cosine (mean, share of negative diagnostics steps), GCG, gap-vs-length Spearman per branch, and the
    lengths of selected vs dropped samples."""

    def col(key: str) -> list[float]:
        return finite([r.get(key) for r in rows])

    cos = col("diag_grad_cos")
    out: dict[str, float | None] = {
        "coherence_full": mean_std(col("diag_coherence_full"))[0],
        "gcg": mean_std(col("diag_gcg"))[0],
        "cross_cos_mean": mean_std(cos)[0],
        "cross_cos_negative_share": (sum(c < 0 for c in cos) / len(cos)) if cos else None,
        "cross_cos_n": len(cos),
    }
    for b in ("general", "domain"):
        out[f"selected_len_mean/{b}"] = mean_std(col(f"selected_len_mean/{b}"))[0]
        out[f"dropped_len_mean/{b}"] = mean_std(col(f"dropped_len_mean/{b}"))[0]
        out[f"spearman_gap_len/{b}"] = mean_std(col(f"spearman_gap_len/{b}"))[0]
        out[f"selected_fraction/{b}"] = mean_std(col(f"selected_fraction/{b}"))[0]
    return out
