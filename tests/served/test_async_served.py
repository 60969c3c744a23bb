"""Served rollouts overlapped with training, against real SGLang 0.5.23: `camopd train` with `rollout.engine:
sglang` over two real SGLang servers of the student (weights synced over gloo) and `rollout.max_staleness: 1`
samples every batch with the weights one version old (from the servers' own weight_version, every sample), logs
the wait and staleness metrics, and gives the same loss curve as the in-process engine's overlapped run (a second
model instance on a thread). A run preempted with a batch in flight at the servers resumes on that saved batch.
Rollouts are greedy: SGLang honours `sampling_seed` only with deterministic inference, which it offers with GPU
attention backends only, so on this CPU a greedy run is what two engines (or two served runs) can agree on."""

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
def test_served_one_step_off_matches_in_process_one_step_off(tiny, sglang_students, tmp_path):
    urls = sglang_students
    teachers = in_process_teachers(tiny)
    ref_dir, served_dir = tmp_path / "inproc", tmp_path / "served"
    ref = start_train(
        _overlapped(write_spec(tiny, ref_dir, teachers, tmp_path / "inproc.yaml", greedy=True)), tmp_path / "inproc.log"
    )
    spec = _overlapped(
        served_rollouts(write_spec(tiny, served_dir, teachers, tmp_path / "served.yaml", greedy=True), urls)
    )
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
    # the server's log-probs (SGLANG_RETURN_ORIGINAL_LOGPROB: temperature 1) are the in-process engine's
    assert abs(rows[1]["train_rollout_lp_absdiff"] - ref_rows[1]["train_rollout_lp_absdiff"]) < 1e-4


def _wait_for_rows(ckpt_dir, proc, n: int, timeout_s: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while len(metrics(ckpt_dir)) < n:
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before step {n}"
        assert time.monotonic() < deadline, f"no step {n} row in {timeout_s}s"
        time.sleep(0.05)


@pytest.mark.timeout(900)
def test_served_preemption_with_a_batch_in_flight_resumes_on_the_saved_batch(tiny, sglang_students, tmp_path):
    """k = 1 over the two real student servers: SIGTERM while step 2 trains (step 3's batch is being sampled by the
    servers with version-1 weights); the trainer drains it into the checkpoint and exits 75; the resumed run
    trains step 3 on that saved batch (not a fresh one sampled with version-2 weights) and its curve equals the
    uninterrupted run's to the servers' float rounding."""
    import json
    import signal

    urls = sglang_students
    teachers = in_process_teachers(tiny)

    def spec(name: str):
        path = write_spec(tiny, tmp_path / name, teachers, tmp_path / f"{name}.yaml", greedy=True)
        path = _overlapped(served_rollouts(path, urls))
        import yaml

        s = yaml.safe_load(path.read_text())
        s["checkpoint"]["resume"] = "auto"
        path.write_text(yaml.safe_dump(s))
        return path

    full_log, part_log, rest_log = tmp_path / "full.log", tmp_path / "part.log", tmp_path / "rest.log"
    assert finish(start_train(spec("full"), full_log), full_log) == 0, full_log.read_text()[-4000:]
    part_spec = spec("part")
    proc = start_train(part_spec, part_log)
    _wait_for_rows(tmp_path / "part", proc, 1)
    proc.send_signal(signal.SIGTERM)  # Slurm's warning: checkpoint after the current step, exit 75
    assert finish(proc, part_log) == 75, part_log.read_text()[-4000:]
    stopped = len(metrics(tmp_path / "part"))  # 2, or 1 if the signal beat step 1's preemption check
    assert stopped in (1, 2) and [r["step"] for r in metrics(tmp_path / "part")] == list(range(1, stopped + 1))
    state = json.loads((tmp_path / "part" / f"iter_{stopped:07d}" / "train_state.json").read_text())
    inflight = state["rollouts_in_flight"]
    # 0-based step indices: the batch of the next step, sampled with the weights of version stopped - 1
    assert inflight["steps"] == [stopped] and inflight["max_staleness"] == 1, inflight
    assert finish(start_train(part_spec, rest_log), rest_log) == 0, rest_log.read_text()[-4000:]

    full, rest = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [r["step"] for r in rest] == [1, 2, 3]
    for r, want in zip(rest, full, strict=True):
        # the saved batch keeps its sampling version: step 3 still lags by one (a batch sampled afresh after the
        # restart would lag by 0)
        assert (r["branch"], r["rollout_staleness_max"], r["stale_samples"]) == (
            want["branch"],
            want["rollout_staleness_max"],
            want["stale_samples"],
        )
        assert r["rollout_staleness_max"] == min(r["step"] - 1, 1)
        # served log-probs depend on how the server batched the requests (float rounding), so two served runs,
        # interrupted or not, agree to rounding, not bit for bit (the in-process resume test is bitwise)
        for key in ("loss", "grad_norm", "mean_gap"):
            assert abs(r[key] - want[key]) < 1e-4, (key, [x[key] for x in rest], [x[key] for x in full])
