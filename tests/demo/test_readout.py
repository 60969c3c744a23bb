"""The method-level readout on synthetic diagnostics whose answer is known: the corrected cosine recovers
anti-aligned branches through noise (its interval below 0) and straddles 0 for unrelated ones; GCG reads its
excess over the null; the predictions P0-P3 hold, fail or are not measured from the numbers given."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_camopd.demo.readout import cosine_readout, method_readout, predictions


def _series(true_cos: float, steps: int, seed: int, n: int = 16, sigma: float = 3.0) -> dict[str, list[float]]:
    """Per step: two branch batches of n noisy per-sample gradients around means with cosine `true_cos`."""
    rng = np.random.default_rng(seed)
    dim = 400
    mu_g = rng.normal(size=dim)
    ortho = rng.normal(size=dim)
    ortho -= ortho @ mu_g / (mu_g @ mu_g) * mu_g
    ortho *= np.linalg.norm(mu_g) / np.linalg.norm(ortho)
    mu_d = true_cos * mu_g + math.sqrt(1 - true_cos**2) * ortho
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    out: dict[str, list[float]] = {"cos": [], "dot": [], "split/general": [], "split/domain": []}
    for _ in range(steps):
        xg = mu_g + sigma * rng.normal(size=(n, dim))
        xd = mu_d + sigma * rng.normal(size=(n, dim))
        gg, gd = xg.mean(0), xd.mean(0)
        out["cos"].append(cos(gg, gd))
        out["dot"].append(float(gg @ gd))
        out["split/general"].append(cos(xg[::2].mean(0), xg[1::2].mean(0)))
        out["split/domain"].append(cos(xd[::2].mean(0), xd[1::2].mean(0)))
    return out


def test_anti_aligned_branches_read_negative_and_are_corrected_towards_the_truth():
    seeds = [_series(-0.8, 12, s) for s in range(5)]
    r = cosine_readout(seeds)
    assert r["steps"] == 60 and r["seeds"] == 5
    assert -0.8 < r["cos"] < -0.1  # attenuated by the batches' noise
    assert r["corrected"] == pytest.approx(-0.8, abs=0.15)
    assert r["corrected_ci"][1] < 0 and r["cos_ci"][1] < 0


def test_unrelated_branches_give_an_interval_around_zero():
    r = cosine_readout([_series(0.0, 12, s) for s in range(5)])
    lo, hi = r["corrected_ci"]
    assert lo < 0 < hi and abs(r["cos"]) < 0.1


def test_no_diagnostics_is_not_measured():
    r = cosine_readout([{}, {"cos": []}])
    assert r["corrected"] is None and r["corrected_ci"] is None and r["steps"] == 0


def _run(seed, general, domain, **ins):
    return {"seed": seed, "accuracy": {"general": general, "domain": domain}, "instruments": ins, "series": {}}


def test_predictions_read_the_numbers():
    base = {"initial student": {"general": 0.25, "domain": 0.9}}
    anti = [_series(-0.8, 12, s) for s in range(5)]
    results = {
        "opd_general": [_run(s, 0.9, 0.1) for s in range(5)],  # the domain drops 80 points: P0 holds
        "mopd_1to1": [
            {**_run(s, 0.3, 0.85, cross_dot_negative_share=0.9 if s else 0.7), "series": anti[s]} for s in range(5)
        ],
        "camopd": [
            _run(
                s,
                0.5 + 0.01 * s,
                0.84,
                **{f"gap_gcg/{b}": 30.0 + s for b in ("general", "domain")},
                **{f"gap_gcg_null/{b}": 20.0 for b in ("general", "domain")},
            )
            for s in range(5)
        ],
        "camopd_random": [_run(s, 0.4, 0.84) for s in range(5)],
    }
    readouts = {m: method_readout(r) for m, r in results.items()}
    got = {name: status for name, status, _ in predictions(results, base, readouts)}
    # P1 fails on one seed with 70% negative dot products, however negative the corrected cosine
    assert got == {"P0": "held", "P1": "failed", "P2": "held", "P3": "held"}
    for r in results["mopd_1to1"]:
        r["instruments"]["cross_dot_negative_share"] = 0.8
    readouts = {m: method_readout(r) for m, r in results.items()}
    assert dict((n, s) for n, s, _ in predictions(results, base, readouts))["P1"] == "held"
    results["camopd"] = [_run(s, 0.5, 0.7) for s in range(5)]  # the domain falls 15 points: P2 fails; no GCG: P3
    readouts = {m: method_readout(r) for m, r in results.items()}
    got = {name: status for name, status, _ in predictions(results, base, readouts)}
    assert got["P2"] == "failed" and got["P3"] == "failed"
    results["opd_general"] = [_run(s, 0.9, 0.85) for s in range(5)]  # 5 points: no conflict to speak of
    del results["camopd_random"]
    got = {name: status for name, status, _ in predictions(results, base, {})}
    assert got == {"P0": "failed", "P1": "not measured", "P2": "failed", "P3": "not measured"}
