"""Multi-seed statistics of the comparison (demo/stats.py, compare_report.summarise) and the report's
counteraction reading: pure functions, checked against hand-computed values."""

from __future__ import annotations

import pytest

from megatron_camopd.demo.compare_report import summarise
from megatron_camopd.demo.report import counteraction
from megatron_camopd.demo.stats import instruments, mean_std, paired_difference, verdict


def test_mean_std_skips_missing_and_nonfinite():
    assert mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([5.0]) == (5.0, 0.0) and mean_std([None]) == (None, None)


def test_paired_difference_pairs_by_position_and_bootstraps_the_mean():
    d = paired_difference([0.80, 0.70, 0.90, 0.75], [0.70, 0.72, 0.60, 0.70])
    assert d["per_seed"] == pytest.approx([0.10, -0.02, 0.30, 0.05])
    assert d["mean"] == pytest.approx(0.1075) and d["n"] == 4
    assert min(d["per_seed"]) <= d["ci_low"] < d["mean"] < d["ci_high"] <= max(d["per_seed"])
    assert paired_difference([0.80, 0.70, 0.90, 0.75], [0.70, 0.72, 0.60, 0.70]) == d  # seeded resampling
    one = paired_difference([0.5], [0.4])
    assert one["ci_low"] is None and "one seed" in verdict(one)
    same = paired_difference([0.5, 0.6], [0.4, 0.5])
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.1)


def test_verdict_reads_the_interval():
    assert "the interval lies above 0" in verdict(paired_difference([0.9, 0.8, 0.85], [0.7, 0.7, 0.7]))
    assert "the interval lies below 0" in verdict(paired_difference([0.5, 0.6, 0.55], [0.7, 0.7, 0.7]))
    assert "contains 0" in verdict(paired_difference([0.9, 0.5, 0.7], [0.7, 0.7, 0.7]))


def test_instruments_and_counteraction():
    cross = {"diag_split_cos/general": 0.2, "diag_split_cos/domain": 0.5, "diag_norm_ratio": 2.0}
    rows = [
        {**cross, "diag_grad_dot": -1.0, "diag_grad_cos": -0.2, "diag_gcg/general": 10.0, "diag_gcg_null/general": 4.0},
        {**cross, "diag_grad_dot": -0.5, "diag_grad_cos": -0.1, "diag_gcg/general": 30.0, "diag_gcg_null/general": 6.0},
        {**cross, "diag_grad_dot": 0.2, "diag_grad_cos": 0.05, "diag_cross/output/cos": -0.4},
        {"diag_coherence_full/domain": 0.3, "diag_gap_gcg/domain": 12.0, "selected_len_mean/general": 5.0},
        {"loss": 1.0},
    ]
    ins = instruments(rows)
    assert ins["cross_cos_mean"] == pytest.approx(-0.25 / 3) and ins["cross_cos_negative_share"] == pytest.approx(2 / 3)
    assert ins["cross_dot_negative_share"] == pytest.approx(2 / 3) and ins["cross_dot_mean"] == pytest.approx(-1.3 / 3)
    assert ins["gcg/general"] == pytest.approx(20.0) and ins["gcg_null/general"] == pytest.approx(5.0)
    assert ins["gap_gcg/domain"] == 12.0 and ins["diag_steps/domain"] == 1 and ins["diag_steps/general"] == 0
    assert ins["norm_ratio"] == 2.0 and ins["tensor_cos/output"] == -0.4
    rel_g, rel_d = 2 * 0.2 / 1.2, 2 * 0.5 / 1.5  # Spearman-Brown of the mean split-half cosines
    assert ins["reliability/general"] == pytest.approx(rel_g) and ins["reliability/domain"] == pytest.approx(rel_d)
    assert ins["cross_cos_corrected"] == pytest.approx((-0.25 / 3) / (rel_g * rel_d) ** 0.5)
    assert counteraction([ins, ins])[0] == "present"
    flipped = dict(ins, cross_cos_negative_share=0.4)
    assert counteraction([ins, flipped])[0] == "not present"
    assert counteraction([{"cross_cos_mean": None, "cross_cos_negative_share": None}])[0].startswith("not measured")


def test_summarise_pairs_methods_with_mopd_on_common_seeds():
    def run(seed, g, d):
        return {
            "seed": seed,
            "accuracy": {"general": g, "domain": d},
            "normalised": {"score": g - 0.5},
            "instruments": {"gcg": 1.0},
            "seconds": 10.0,
        }

    results = {
        "mopd_1to1": [run(0, 0.7, 0.9), run(1, 0.6, 0.9), run(2, 0.65, 0.9)],
        "camopd": [run(0, 0.8, 0.95), run(2, 0.7, 0.9)],
    }
    s = summarise(results, ["domain", "general"])
    assert "paired" not in s["mopd_1to1"] and s["camopd"]["seconds"] == 20.0
    assert s["camopd"]["paired"]["general"]["per_seed"] == pytest.approx([0.1, 0.05])  # seeds 0 and 2 only
    assert s["camopd"]["accuracy"]["general"][0] == pytest.approx(0.75)
