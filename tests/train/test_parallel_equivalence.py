"""The loss a step optimises does not depend on the parallel layout: TP=2, PP=2 and DP=2 reproduce TP=1.

Rollouts are seeded per (seed, step, sample index), so every layout samples the same tokens; teachers score them
with the same layout; the per-step losses must agree within 1e-4 (float reassociation only).
"""

from __future__ import annotations

import math

import pytest

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import run_train, tiny_overrides

STEPS = 4


def _losses(rows):
    return [r["loss"] for r in rows]


@pytest.mark.multiproc
def test_tp2_pp2_dp2_match_tp1(tiny_root, tmp_path):
    base = run_on_ranks(run_train, 1, tiny_overrides(tiny_root, tmp_path / "tp1", f"train.steps={STEPS}"))[0]
    assert len(base) == STEPS and all(math.isfinite(x) for x in _losses(base))
    assert [r["branch"] for r in base] == ["general", "general", "general", "domain"]
    for name, extra in (
        ("tp2", "parallel.tp=2"),
        ("pp2", "parallel.pp=2"),
        ("dp2", "train.micro_batch_size=2"),
        ("dp2_distopt", "train.distributed_optimizer=true"),
    ):
        rows = run_on_ranks(run_train, 2, tiny_overrides(tiny_root, tmp_path / name, f"train.steps={STEPS}", extra))[0]
        assert [r["branch"] for r in rows] == [r["branch"] for r in base], name
        for a, b in zip(_losses(base), _losses(rows)):
            assert abs(a - b) < 1e-4, (name, _losses(base), _losses(rows))
        for a, b in zip(base, rows):
            assert a["selected_fraction"] == b["selected_fraction"], name
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * max(1.0, a["grad_norm"]), name


@pytest.mark.multiproc
def test_gradient_diagnostics_do_not_depend_on_dp(tiny_root, tmp_path):
    extra = (
        "train.steps=1",
        "schedule.mode=mixed",
        "schedule.mix_ratio=[1,1]",
        "logging.diagnostics=true",
        "logging.diagnostics_interval=1",
        "logging.diagnostics_start=0",
        "train.micro_batch_size=2",
    )
    one = run_on_ranks(run_train, 1, tiny_overrides(tiny_root, tmp_path / "d1", *extra))[0][0]
    two = run_on_ranks(run_train, 2, tiny_overrides(tiny_root, tmp_path / "d2", *extra))[0][0]
    keys = ["diag_grad_dot", "diag_grad_cos", "diag_norm_ratio", "diag_counteracted"]
    keys += [f"diag_{k}/{b}" for k in ("coherence_full", "gap_coherence_selected") for b in ("general", "domain")]
    for key in keys:
        assert math.isfinite(one[key]), key
        assert abs(one[key] - two[key]) <= 1e-4 * max(1.0, abs(one[key])), (key, one[key], two[key])


@pytest.mark.multiproc
def test_dp2_one_step_off_matches_dp1(tiny_root, tmp_path):
    """`rollout.max_staleness: 1` at DP=2 (each rank's generating thread samples its slice with the copied
    version-t weights; the DP exchange stays on the main thread) trains the same curve as at DP=1, every sample
    one version old once the pipeline is full."""
    extra = (f"train.steps={STEPS}", "rollout.max_staleness=1", "train.micro_batch_size=2")
    one = run_on_ranks(run_train, 1, tiny_overrides(tiny_root, tmp_path / "k1_dp1", *extra))[0]
    two = run_on_ranks(run_train, 2, tiny_overrides(tiny_root, tmp_path / "k1_dp2", *extra))[0]
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        lag = min(a["step"] - 1, 1)
        assert a["rollout_staleness_max"] == b["rollout_staleness_max"] == lag
        assert a["rollout_staleness_mean"] == b["rollout_staleness_mean"] == lag
        assert a["branch"] == b["branch"] and a["selected_fraction"] == b["selected_fraction"]
        assert abs(a["loss"] - b["loss"]) < 1e-4, (_losses(one), _losses(two))
    assert any(r["train_rollout_lp_absdiff"] > 0 for r in two[1:])  # trained on rollouts of older weights


@pytest.mark.multiproc
def test_uneven_dp_slices_run_the_same_passes_on_every_rank(tiny_root, tmp_path):
    """5 samples over DP = 2 (slices of 3 and 2 rows) in mixed steps (each rank's rows split differently between
    the branches) with the diagnostics on: every rank runs the same number of forward and backward passes, in
    training and in the diagnostics, as FP8's delayed scaling needs (it all-reduces amaxes over TP x DP at every
    forward, so a rank with a pass fewer would hang the others under NCCL)."""
    from ._workers import count_passes

    extra = (
        "train.steps=2",
        "schedule.mode=mixed",
        "schedule.mix_ratio=[3,2]",
        "rollout.prompts_per_step=5",
        "logging.diagnostics=true",
        "logging.diagnostics_interval=1",
        "logging.diagnostics_start=0",
        "train.micro_batch_size=1",
    )
    out = run_on_ranks(count_passes, 2, tiny_overrides(tiny_root, tmp_path / "uneven", *extra))
    a, b = out[0]["counts"], out[1]["counts"]
    assert a == b, (a, b)
    # training: 3 micro-batches a step (the largest slice) on both ranks, each with its backward
    assert a["train"] == [2 * 3, 2 * 3], a
    assert a["diag"][0] == a["diag"][1] >= 2 * 3, a  # per-sample passes and the branch gradients
    rows = out[0]["rows"]
    keys = ("diag_coherence_full/general", "diag_coherence_full/domain", "diag_grad_cos")
    assert len(rows) == 2 and all(math.isfinite(r[k]) for r in rows for k in keys), rows
    # the filler rows change nothing: DP = 2 trains DP = 1's losses
    one = run_on_ranks(run_train, 1, tiny_overrides(tiny_root, tmp_path / "uneven1", *extra))[0]
    for r1, r2 in zip(one, rows, strict=True):
        assert abs(r1["loss"] - r2["loss"]) < 1e-4
        assert all(abs(r1[k] - r2[k]) < 1e-4 for k in keys[:2]), (r1, r2)
