"""The method-level readout of the gradient instruments and the pre-registered predictions P0-P3.

Per method, over its seeds: the cross-branch cosine raw and attenuation-corrected (pooled over every diagnostic
step of every seed, with a two-level bootstrap interval: seeds resampled, then steps within each seed), the
dot-product sign rate (share of diagnostic steps with <g_g, g_d> < 0: mean and the lowest seed), the norm ratio
and counteracted fraction, and per branch GCG of the gap selection against its size-matched random-subset null
(the paired difference over seeds with its bootstrap interval). `predictions` reads P0-P3 (README, "signoff"
setting) from these numbers; a prediction whose inputs are missing is "not measured", never "held".
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from megatron_camopd.algo.diagnostics import spearman_brown
from megatron_camopd.demo.stats import finite, mean_std, paired_difference

RESAMPLES = 2000


def _corrected(cos: np.ndarray, split_g: np.ndarray, split_d: np.ndarray) -> float:
    """mean cos / sqrt(rel_g rel_d), rel = Spearman-Brown of the mean split-half cosine; nan if a rel <= 0."""
    rel_g, rel_d = spearman_brown(float(split_g.mean())), spearman_brown(float(split_d.mean()))
    if not (rel_g > 0 and rel_d > 0):
        return math.nan
    return float(cos.mean()) / math.sqrt(rel_g * rel_d)


def cosine_readout(per_seed: list[dict[str, list[float]]], level: float = 0.95, seed: int = 0) -> dict:
    """Raw and corrected cross-branch cosine of a method from each seed's `stats.series`: pooled point
    estimates and two-level bootstrap intervals (`*_ci`); `corrected_undefined` is the share of resamples whose
    reliability was not positive (no signal above the noise floor to correct)."""
    runs = [{k: np.asarray(v, dtype=float) for k, v in s.items()} for s in per_seed if s and s.get("cos")]
    out: dict = {"steps": sum(len(r["cos"]) for r in runs), "seeds": len(runs)}
    if not runs:
        return {**out, "cos": None, "cos_ci": None, "corrected": None, "corrected_ci": None}
    cat = {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}
    corr = _corrected(cat["cos"], cat["split/general"], cat["split/domain"])
    out.update(cos=float(cat["cos"].mean()), corrected=corr if math.isfinite(corr) else None)
    rng = np.random.default_rng(seed)
    raw, cor = [], []
    for _ in range(RESAMPLES):
        picked = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        idx = [rng.integers(0, len(r["cos"]), len(r["cos"])) for r in picked]
        res = {k: np.concatenate([r[k][i] for r, i in zip(picked, idx)]) for k in cat}
        raw.append(float(res["cos"].mean()))
        cor.append(_corrected(res["cos"], res["split/general"], res["split/domain"]))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out["cos_ci"] = [float(x) for x in np.percentile(raw, q)]
    good = [c for c in cor if math.isfinite(c)]
    out["corrected_undefined"] = 1 - len(good) / len(cor)
    out["corrected_ci"] = [float(x) for x in np.percentile(good, q)] if good else None
    return out


def gcg_readout(runs: list[dict], branch: str, prefix: str = "gap_") -> dict:
    """GCG of a selection (`gap_`: the gap selection CaMOPD makes, measured in every method; `""`: the method's own)
    in `branch` against its size-matched null: means over seeds and the paired excess with its interval."""
    ins = [r.get("instruments", {}) for r in runs]
    gcg = [i.get(f"{prefix}gcg/{branch}") for i in ins]
    null = [i.get(f"{prefix}gcg_null/{branch}") for i in ins]
    return {
        "gcg": mean_std(gcg)[0],
        "null": mean_std(null)[0],
        "excess": paired_difference(gcg, null),
        "precision": mean_std([i.get(f"{prefix}sel_precision/{branch}") for i in ins])[0],
        "base_rate": mean_std([i.get(f"{prefix}sel_base_rate/{branch}") for i in ins])[0],
    }


def method_readout(runs: list[dict]) -> dict:
    """Everything the instruments table shows for one method (None where not measured)."""
    ins = [r.get("instruments", {}) for r in runs]
    dot_neg = finite([i.get("cross_dot_negative_share") for i in ins])
    return {
        "cosine": cosine_readout([r.get("series", {}) for r in runs]),
        "dot_negative_share": statistics.fmean(dot_neg) if dot_neg else None,
        "dot_negative_share_min": min(dot_neg) if dot_neg else None,
        "dot_mean": mean_std([i.get("cross_dot_mean") for i in ins])[0],
        "norm_ratio": mean_std([i.get("norm_ratio") for i in ins])[0],
        "counteracted": mean_std([i.get("counteracted") for i in ins])[0],
        "reliability": {b: mean_std([i.get(f"reliability/{b}") for i in ins])[0] for b in ("general", "domain")},
        "gcg": {b: gcg_readout(runs, b) for b in ("general", "domain")},
        "own_gcg": {b: gcg_readout(runs, b, prefix="") for b in ("general", "domain")},
    }


def _paired(results: dict, a: str, b: str, domain: str) -> dict | None:
    if a not in results or b not in results:
        return None
    mine = {r["seed"]: r["accuracy"][domain] for r in results[a]}
    theirs = {r["seed"]: r["accuracy"][domain] for r in results[b]}
    common = sorted(set(mine) & set(theirs))
    return paired_difference([mine[k] for k in common], [theirs[k] for k in common])


def _ci(d: dict | None, scale: float = 100.0) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    if d.get("ci_low") is None:
        return f"{scale * d['mean']:+.1f} (one seed)"
    return f"{scale * d['mean']:+.1f} [{scale * d['ci_low']:+.1f}, {scale * d['ci_high']:+.1f}]"


def predictions(results: dict, baselines: dict, readouts: dict) -> list[tuple[str, str, str]]:
    """(name, "held" | "failed" | "not measured", the numbers) for P0-P3 (the README states them and what
    falsifies each). P0's drop is from `baselines["initial student"]` (the domain teacher in CaMOPD's setting)."""
    out: list[tuple[str, str, str]] = []
    start = baselines.get("initial student")
    if "opd_general" in results and start is not None and "domain" in start:
        drops = [start["domain"] - r["accuracy"]["domain"] for r in results["opd_general"]]
        m, sd = mean_std(drops)
        if m is None or sd is None:
            out.append(("P0", "not measured", "no finite domain accuracy of the general-only (1:0) runs"))
        else:
            text = f"1:0 drops the domain by {100 * m:.1f} ± {100 * sd:.1f} points ({len(drops)} seeds; needs >= 10)"
            out.append(("P0", "held" if m >= 0.10 else "failed", text))
    else:
        out.append(("P0", "not measured", "no general-only (1:0) run"))
    mo = readouts.get("mopd_1to1")
    if mo and mo["dot_negative_share_min"] is not None and mo["cosine"]["corrected_ci"]:
        lo, hi = mo["cosine"]["corrected_ci"]
        ok = mo["dot_negative_share_min"] >= 0.75 and hi < 0
        text = (
            f"MOPD 1:1: <g_g, g_d> < 0 on {100 * mo['dot_negative_share']:.0f}% of diagnostic steps (lowest seed "
            f"{100 * mo['dot_negative_share_min']:.0f}%; needs >= 75% in every seed); corrected cosine "
            f"{mo['cosine']['corrected']:+.2f} [{lo:+.2f}, {hi:+.2f}] (needs the interval below 0)"
        )
        out.append(("P1", "held" if ok else "failed", text))
    else:
        out.append(("P1", "not measured", "no MOPD 1:1 cross-branch diagnostics with a defined corrected cosine"))
    g, d = _paired(results, "camopd", "mopd_1to1", "general"), _paired(results, "camopd", "mopd_1to1", "domain")
    if g and d and g["mean"] is not None and d["mean"] is not None:
        ok = g["mean"] >= 0.07 and d["mean"] >= -0.02
        text = f"CaMOPD - MOPD 1:1: general {_ci(g)} (needs >= +7), domain {_ci(d)} (needs >= -2) points"
        out.append(("P2", "held" if ok else "failed", text))
    else:
        out.append(("P2", "not measured", "CaMOPD and MOPD 1:1 need paired seeds"))
    g, d = _paired(results, "camopd", "camopd_random", "general"), _paired(results, "camopd", "camopd_random", "domain")
    ca = readouts.get("camopd")
    if g and d and g["mean"] is not None and ca:
        ex = {b: ca["gcg"][b]["excess"] for b in ("general", "domain")}
        beats = g["ci_low"] is not None and g["ci_low"] > 0 and d["mean"] >= -0.02
        gcg_ok = all(e["ci_low"] is not None and e["ci_low"] > 0 for e in ex.values())
        text = (
            f"CaMOPD - random subset of the same size: general {_ci(g)} (needs the interval above 0), domain "
            f"{_ci(d)} (needs >= -2); CaMOPD's GCG - its null: general {_ci(ex['general'], 1.0)}, domain "
            f"{_ci(ex['domain'], 1.0)} %-points (need both intervals above 0)"
        )
        out.append(("P3", "held" if beats and gcg_ok else "failed", text))
    else:
        out.append(("P3", "not measured", "CaMOPD and its random-subset ablation need paired seeds"))
    return out
