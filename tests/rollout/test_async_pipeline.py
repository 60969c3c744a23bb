"""Rollouts overlapped with training, in process (`rollout.engine: megatron`, `rollout.max_staleness: k`): every
sample's weight_version lags the trainer's by exactly min(step, k) <= k (k = 1, 2), checked per sample as the
trainer takes each batch; a k=1 run preempted (SIGTERM) at step 3 of 6, rollouts in flight saved, and resumed
reproduces the uninterrupted loss curve bit for bit from metrics.jsonl (a copy with one flipped byte in its saved
in-flight batch is refused naming the file); k=0 still takes the on-policy path;
TP/PP > 1 in process
is refused by the spec check with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_camopd.backend.spawn import run_on_ranks
from megatron_camopd.config import load_spec
from megatron_camopd.errors import SpecError
from tests.train._workers import TINY_SPEC, tiny_overrides

STEPS = 6


def _train_recording(overrides: list[str], preempt_at: int | None = None) -> tuple[list[dict], list]:
    """Train; record (step, trainer version, every sample's weight_version) as each batch is taken. With
    `preempt_at`, the process sends itself SIGTERM while that step trains (Slurm's warning): the loop checkpoints
    after it, rollouts in flight, and stops."""
    import os
    import signal
    from unittest import mock

    from megatron_camopd.config import load_spec
    from megatron_camopd.loop.metrics import read_metrics
    from megatron_camopd.loop.train import train
    from megatron_camopd.rollout.pipeline import RolloutPipeline

    seen: list[tuple[int, int, list[int]]] = []
    real = RolloutPipeline.batch

    def batch(self, step):
        branch, samples, metrics = real(self, step)
        trainer = int(self.engine.scheduler.num_steps)
        seen.append((step, trainer, [int(s.rollout.meta["weight_version"]) for s in samples]))
        if step == preempt_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return branch, samples, metrics

    spec = load_spec(TINY_SPEC, overrides)
    with mock.patch.object(RolloutPipeline, "batch", batch):
        last = train(spec)
    assert bool(last.get("preempted")) == (preempt_at is not None)
    return read_metrics(Path(spec.checkpoint.dir) / "metrics.jsonl"), seen


def runs(rank: int, world: int, root: str, out: str) -> dict:
    root, out = Path(root), Path(out)

    def o(name: str, *extra: str) -> list[str]:
        return tiny_overrides(root, out / name, "rollout.prompts_per_step=4", "train.micro_batch_size=2", *extra)

    res = {}
    res["k1"] = _train_recording(
        o("k1", f"train.steps={STEPS}", "rollout.max_staleness=1", "checkpoint.save_interval=3")
    )
    interrupted = o("part", f"train.steps={STEPS}", "rollout.max_staleness=1", "checkpoint.save_interval=0")
    res["part"] = _train_recording(interrupted, preempt_at=2)  # stops after step 3 of 6
    res["part_state"] = json.loads((out / "part" / "iter_0000003" / "train_state.json").read_text())
    # a copy of the interrupted run with one flipped byte in its saved in-flight batch: refused before training
    import shutil

    from megatron_camopd.errors import CheckpointError

    shutil.copytree(out / "part", out / "corrupt")
    bad = out / "corrupt" / "iter_0000003" / "inflight_rollouts.pt"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    try:
        _train_recording(o("corrupt", f"train.steps={STEPS}", "rollout.max_staleness=1", "checkpoint.save_interval=0"))
        res["corrupt_error"] = None
    except CheckpointError as exc:
        res["corrupt_error"] = str(exc)
    res["rest"] = _train_recording(interrupted)  # resume: the in-flight batch of step 3 comes from the checkpoint
    res["k2"] = _train_recording(o("k2", "train.steps=4", "rollout.max_staleness=2", "checkpoint.save_interval=0"))
    res["k0"] = _train_recording(o("k0", "train.steps=2", "checkpoint.save_interval=0"))
    res["inflight_files"] = {
        d.name: json.loads((d / "manifest.json").read_text())["files"] for d in sorted((out / "k1").glob("iter_*"))
    }
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from megatron_camopd.demo.tiny import make_tiny_setup

    root = make_tiny_setup(tmp_path_factory.mktemp("async_tiny"))
    return run_on_ranks(runs, 1, str(root), str(tmp_path_factory.mktemp("async_runs")))[0]


def _curve(rows):
    return [(r["step"], r["branch"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("run,k", [("k1", 1), ("k2", 2)])
def test_staleness_never_exceeds_the_bound(results, run, k):
    rows, seen = results[run]
    assert [s for s, _, _ in seen] == list(range(len(rows)))
    for step, trainer, versions in seen:
        assert trainer == step and versions, (step, trainer)
        lags = [trainer - v for v in versions]
        assert all(0 <= lag <= k for lag in lags), (step, lags)
        assert lags == [min(step, k)] * len(lags)  # exactly k steps off once the pipeline is full
    for r, (step, _, _versions) in zip(rows, seen):
        assert r["rollout_staleness_max"] == min(step, k) and r["rollout_staleness_mean"] == min(step, k)
        assert r["rollout_wait_s"] >= 0 and r["weight_wait_s"] >= 0 and r["loss"] == r["loss"]
    # stale rollouts differ from the policy that trains on them: the IS weight has work to do
    assert any(r["train_rollout_lp_absdiff"] > 0 for r in rows[k:])


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_resume_with_rollouts_in_flight_is_bitwise_identical(results):
    full, _ = results["k1"]
    part, _ = results["part"]
    rest, seen = results["rest"]
    assert [r["step"] for r in rest] == list(range(1, STEPS + 1))  # the resumed run appends to metrics.jsonl
    assert _curve(rest) == _curve(full)
    assert _curve(part) == _curve(full)[:3]
    entry = results["part_state"]["rollouts_in_flight"]
    assert entry["steps"] == [3] and entry["max_staleness"] == 1
    assert seen[0][0] == 3 and set(seen[0][2]) == {2}  # re-entered with the version it was sampled with
    # saved inside the checkpoint and covered by its manifest; the final checkpoint has nothing in flight
    listed = {name: [e["path"] for e in files] for name, files in results["inflight_files"].items()}
    assert "inflight_rollouts.pt" in listed["iter_0000003"] and "inflight_rollouts.pt" not in listed["iter_0000006"]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_corrupted_in_flight_batch_is_refused_by_name(results):
    err = results["corrupt_error"]
    assert err is not None and "inflight_rollouts.pt" in err and "corrupted" in err, err


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_staleness_zero_stays_on_policy(results):
    rows, seen = results["k0"]
    assert seen == []  # the pipeline is not used
    assert [r["rollout_staleness_max"] for r in rows] == [0.0, 0.0] and all(r["weight_wait_s"] == 0 for r in rows)


def test_in_process_overlap_refuses_model_parallel():
    from megatron_camopd.demo.tiny import tiny_spec_overrides

    base = tiny_spec_overrides(Path("/nonexistent"))
    for extra in (["parallel.tp=2"], ["parallel.pp=2"]):
        with pytest.raises(SpecError, match=r"rollout\.max_staleness.*parallel\.tp = parallel\.pp = 1"):
            load_spec(TINY_SPEC, [*base, "rollout.max_staleness=1", *extra])
    with pytest.raises(SpecError, match=r"rollout\.max_staleness"):
        load_spec(TINY_SPEC, [*base, "rollout.max_staleness=-1"])
    with pytest.raises(SpecError, match=r"rollout\.max_staleness.*FP8 scaling state is process-wide"):
        load_spec(TINY_SPEC, [*base, "rollout.max_staleness=1", "parallel.fp8.enabled=true"])
    assert load_spec(TINY_SPEC, [*base, "rollout.max_staleness=1"]).rollout.max_staleness == 1
    assert load_spec(TINY_SPEC, [*base, "parallel.tp=2"]).rollout.max_staleness == 0


@pytest.mark.multiproc
def test_rollout_thread_forward_does_not_race_the_trainers_rng_tracker():
    from tests.rollout._workers import rng_fork_interleaving

    out = run_on_ranks(rng_fork_interleaving, 1)[0]
    assert out["plain"] is not None and "current state name" in out["plain"], out  # the hazard, shown
    assert out["routed"] is None and out["routed_name"] == "default-rng", out  # the pipeline's tracker


def test_rollout_thread_runs_on_its_creators_cuda_device(monkeypatch):
    """CUDA's current device is per thread and a new thread starts on device 0, so `set_device(current_device())`
    inside the generating thread put every rank's rollouts on cuda:0. Modelled with per-thread current devices:
    the pipeline's thread takes the device of the thread that built it (here rank 3's)."""
    import threading

    from megatron_camopd.rollout import pipeline

    current = {threading.get_ident(): 3}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current.get(threading.get_ident(), 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.__setitem__(threading.get_ident(), int(d)))
    pool = pipeline.rollout_executor()
    try:
        assert pool.submit(torch.cuda.current_device).result(timeout=60) == 3
    finally:
        pool.shutdown(wait=True)
