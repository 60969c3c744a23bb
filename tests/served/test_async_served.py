"""Served rollouts overlapped with training: `camopd train` with `rollout.engine: sglang` over two `camopd serve`
student replicas (their own processes, real HTTP, weights synced over gloo) and `rollout.max_staleness: 1` samples
every batch with the weights one version old (from the servers' own weight_version, every sample), logs the wait
and staleness metrics, and gives the same loss curve as the in-process engine's overlapped run (a second model
instance on a thread)."""

from __future__ import annotations

import math

import pytest

from .conftest import STEPS, finish, in_process_teachers, metrics, served_rollouts, start_train, write_spec

pytestmark = pytest.mark.multiproc


def _overlapped(spec_path):
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    spec["rollout"]["max_staleness"] = 1
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path


@pytest.mark.timeout(600)
def test_served_one_step_off_matches_in_process_one_step_off(tiny, student_replicas, tmp_path):
    urls = [r.url for r in student_replicas]
    teachers = in_process_teachers(tiny)
    ref_dir, served_dir = tmp_path / "inproc", tmp_path / "served"
    ref = start_train(
        _overlapped(write_spec(tiny, ref_dir, teachers, tmp_path / "inproc.yaml")), tmp_path / "inproc.log"
    )
    spec = _overlapped(served_rollouts(write_spec(tiny, served_dir, teachers, tmp_path / "served.yaml"), urls))
    served_log = tmp_path / "served.log"
    assert finish(start_train(spec, served_log), served_log) == 0, served_log.read_text()[-4000:]
    assert finish(ref, tmp_path / "inproc.log") == 0, (tmp_path / "inproc.log").read_text()[-4000:]
    rows, ref_rows = metrics(served_dir), metrics(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, want in zip(rows, ref_rows, strict=True):
        lag = min(r["step"] - 1, 1)
        # every sample's server-reported weight_version lags by exactly `lag` (mean == max == lag)
        assert r["rollout_staleness_max"] == lag and r["rollout_staleness_mean"] == lag, r
        assert want["rollout_staleness_max"] == lag and want["rollout_staleness_mean"] == lag, want
        assert r["stale_dropped"] == 0 and r["stale_samples"] == (4 if lag else 0), r
        assert r["weight_sync_servers"] == 2 and r["rollout_wait_s"] >= 0 and r["weight_wait_s"] >= 0, r
        assert math.isfinite(r["loss"]) and r["branch"] == want["branch"]
        assert abs(r["loss"] - want["loss"]) < 1e-4, ([x["loss"] for x in rows], [x["loss"] for x in ref_rows])
    assert rows[1]["train_rollout_lp_absdiff"] > 1e-6  # sampled with other weights than it trains
