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


BRANCH_KEYS = (
    "coherence_full",
    "gcg",
    "gcg_null",
    "gcg_excess",
    "gap_gcg",
    "gap_gcg_null",
    "gap_gcg_excess",
    "sel_precision",
    "sel_base_rate",
    "gap_sel_precision",
    "gap_sel_base_rate",
    "gap_sel_lift",
)


def _col(rows: list[dict], key: str) -> list[float]:
    return finite([r.get(key) for r in rows])


def _share_negative(vals: list[float]) -> float | None:
    return sum(v < 0 for v in vals) / len(vals) if vals else None


def instruments(rows: list[dict]) -> dict[str, float | None]:
    """The referee's instruments over one run's metrics rows (diagnostic rows only; step 0 is never one,
    `logging.diagnostics_start`): the cross-branch dot product and cosine (mean, share of negative steps), the
    norm ratio ||g_d|| / ||g_g||, the counteracted fraction -<g_g, g_d> / ||g_g||^2, each branch's split-half
    cosine and the reliability of its full batch (Spearman-Brown of the mean split-half cosine), the
    attenuation-corrected cosine of the run (mean cosine / sqrt(rel_g rel_d)), the per-tensor cosines and dot
    shares, and per branch (`/general`, `/domain`: a mixed step reports both) the coherence, GCG of the method's
    own selection and of the gap selection against their size-matched random-subset nulls, the selection's
    precision on the samples that carry the conflict, plus the gap-vs-length and selected-length readouts."""
    from megatron_camopd.algo.diagnostics import corrected_cosine, spearman_brown

    cross = [r for r in rows if r.get("diag_grad_dot") is not None]
    cos, dot = _col(cross, "diag_grad_cos"), _col(cross, "diag_grad_dot")
    out: dict[str, float | None] = {
        "cross_cos_mean": mean_std(cos)[0],
        "cross_cos_negative_share": _share_negative(cos),
        "cross_cos_n": len(cos),
        "cross_dot_mean": mean_std(dot)[0],
        "cross_dot_negative_share": _share_negative(dot),
        "norm_ratio": mean_std(_col(cross, "diag_norm_ratio"))[0],
        "counteracted": mean_std(_col(cross, "diag_counteracted"))[0],
    }
    for b in ("general", "domain"):
        r = mean_std(_col(cross, f"diag_split_cos/{b}"))[0]
        out[f"split_cos/{b}"] = r
        out[f"reliability/{b}"] = spearman_brown(r) if r is not None else None
        for k in BRANCH_KEYS:
            out[f"{k}/{b}"] = mean_std(_col(rows, f"diag_{k}/{b}"))[0]
        out[f"diag_steps/{b}"] = len(_col(rows, f"diag_coherence_full/{b}"))
        out[f"selected_len_mean/{b}"] = mean_std(_col(rows, f"selected_len_mean/{b}"))[0]
        out[f"dropped_len_mean/{b}"] = mean_std(_col(rows, f"dropped_len_mean/{b}"))[0]
        out[f"spearman_gap_len/{b}"] = mean_std(_col(rows, f"spearman_gap_len/{b}"))[0]
        out[f"selected_fraction/{b}"] = mean_std(_col(rows, f"selected_fraction/{b}"))[0]
    c, rel_g, rel_d = out["cross_cos_mean"], out["reliability/general"], out["reliability/domain"]
    corr = math.nan
    if c is not None and rel_g is not None and rel_d is not None:
        corr = corrected_cosine(c, rel_g, rel_d)
    out["cross_cos_corrected"] = corr if math.isfinite(corr) else None
    groups = sorted({k.split("/")[1] for r in cross for k in r if k.startswith("diag_cross/")})
    for g in groups:
        out[f"tensor_cos/{g}"] = mean_std(_col(cross, f"diag_cross/{g}/cos"))[0]
        out[f"tensor_dot_share/{g}"] = mean_std(_col(cross, f"diag_cross/{g}/dot_share"))[0]
    return out


def series(rows: list[dict]) -> dict[str, list[float]]:
    """The per-step cross-branch readings of one run, aligned (steps where every one of them is finite): the
    cosine, the dot product and each branch's split-half cosine -- what the method-level bootstrap resamples."""
    keys = {"cos": "diag_grad_cos", "dot": "diag_grad_dot"}
    keys.update({f"split/{b}": f"diag_split_cos/{b}" for b in ("general", "domain")})
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in rows:
        got = [r.get(v) for v in keys.values()]
        vals = [float(v) for v in got if v is not None]
        if len(vals) == len(got) and all(math.isfinite(v) for v in vals):
            for k, v in zip(keys, vals, strict=True):
                out[k].append(v)
    return out
