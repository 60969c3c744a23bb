"""The on-policy distillation loop (and SFT), one short file.

    for each step:  branch = schedule.next()                     (G,G,G,D,... or mixed)
                    samples = collect_step(...)                  (prompts -> rollouts -> teacher scores)
                    signals = method.prepare(signal_batch(...))  (gaps, selection, calibration)
                    engine.train_step(my DP slice, loss)         (Megatron forward/backward + optimizer)
                    metrics row, checkpoint, preemption check

Resume: `checkpoint.resume: auto` continues from the newest checkpoint whose manifest verifies (model, optimizer,
LR schedule, branch-schedule position, data positions, method state, RNG); a resumed CPU run reproduces the
uninterrupted loss curve bit for bit. Spec changes since the checkpoint are reported, then applied or refused
(resume.py). On SIGUSR1/SIGTERM (Slurm's warning before the time limit) the loop checkpoints after
the current step and exits with code 75 so the launcher requeues the job.

`rollout.max_staleness: k > 0` overlaps rollouts with training (`rollout/pipeline.py`): the batch of step t + k is
sampled while step t trains; checkpoints drain the batches in flight and save their rollouts, so resume stays
bitwise.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_camopd.algo.diagnostics import diagnostics_due
from megatron_camopd.backend.checkpoint import load_checkpoint, save_checkpoint, write_model_meta
from megatron_camopd.backend.forward import comm_device
from megatron_camopd.backend.loss import LossSpec
from megatron_camopd.config import load_spec
from megatron_camopd.errors import CheckpointError
from megatron_camopd.metrics import MetricsWriter
from megatron_camopd.resume import ResumePlan, plan_resume
from megatron_camopd.rollout.assemble import StepBatch, signal_batch
from megatron_camopd.rollout.collect import collect_step
from megatron_camopd.rollout.offline import balance_streams
from megatron_camopd.rollout.pipeline import RolloutPipeline
from megatron_camopd.rollout.staleness import staleness_metrics
from megatron_camopd.session import Session, open_session
from megatron_camopd.steplog import conflict_token_ids, diagnostics_row, step_row

log = logging.getLogger("megatron_camopd")
EXIT_REQUEUE = 75


class Preemption:
    """Turns Slurm's pre-timeout signal into a flag checked (and agreed on by all ranks) at step boundaries."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing after this step", signum)
        self.flag = True

    def requested(self) -> bool:
        """This rank saw the signal (no collective: for waits that must end early, e.g. a weight sync)."""
        return self.flag

    def agreed(self) -> bool:
        t = torch.tensor([1.0 if self.flag else 0.0], device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _loss_spec(spec) -> LossSpec:
    m = spec.method
    return LossSpec(
        loss=m.method_class().loss_kind(m.loss),
        is_weight=m.is_weight,
        eps_low=m.eps_low,
        eps_high=m.eps_high,
        is_cap=m.is_cap,
    )


def _train_state(session: Session) -> dict:
    state = {
        "spec": session.spec.to_dict(),  # resume compares it with the new spec (resume.py)
        "schedule": session.schedule.state_dict(),
        "streams": {cfg.name: s.state_dict() for streams in session.streams.values() for cfg, s in streams},
    }
    method_state = session.method.state_dict()
    if method_state:
        state["method"] = method_state
    return state


def _restore(session: Session, state: dict) -> None:
    session.schedule.load_state_dict(state["schedule"])
    for streams in session.streams.values():
        for cfg, s in streams:
            if cfg.name not in state["streams"]:
                raise CheckpointError(f"checkpoint has no position for data stream {cfg.name!r}")
            s.load_state_dict(state["streams"][cfg.name])
    if "method" in state:
        session.method.load_state_dict(state["method"])


def _resume(session: Session, plan: ResumePlan) -> int:
    path = plan.path  # chosen and verified by plan_resume (with resume: auto, the newest that verifies)
    if path is None:
        return 0
    e = session.engine
    state = load_checkpoint(path, e.models(), e.optimizer, e.scheduler, verify=False)
    _restore(session, state)
    session.resumed = (Path(path), state)  # rollouts in flight re-enter the pipeline (rollout/pipeline.py)
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def diagnosed(spec, schedule, step: int) -> bool:
    """Whether step `step` (0-based) runs the gradient diagnostics: `logging.diagnostics_interval` (and
    `diagnostics_interval_domain` for domain steps) counted per branch of `schedule` from `diagnostics_start`."""
    lg = spec.logging
    return diagnostics_due(
        step,
        schedule.at,
        schedule.period,
        lg.diagnostics_interval,
        lg.diagnostics_interval_domain,
        lg.diagnostics_start,
    )


def run_step(
    session: Session, step: int, loss_spec: LossSpec, cache: dict, pipe: RolloutPipeline | None = None
) -> dict:
    """One on-policy step (with `pipe`: on the batch sampled while earlier steps trained); returns its metrics row."""
    spec, engine = session.spec, session.engine
    t0 = time.time()
    if pipe is None:
        branch = session.schedule.next()
        samples = collect_step(session.collector, step, branch)
        overlap = {"weight_wait_s": 0.0, **staleness_metrics(samples, step)}
    else:
        branch, samples, overlap = pipe.batch(step)
    t_rollout = time.time() - t0
    overlap.setdefault("rollout_wait_s", t_rollout)
    weights = {k: t.weight for k, t in spec.teachers.items()}
    sig = signal_batch(samples, weights)
    signals = session.method.prepare(sig)
    step_batch = StepBatch.of(samples, sig, signals, session.dp_rank, session.dp_size)
    batch = step_batch.megatron(session.tokenizer.pad_id, spec.train.micro_batch_size, topk=loss_spec.loss == "topk")
    row = {}
    lg = spec.logging
    if lg.diagnostics:
        if diagnosed(spec, session.schedule, step):
            row.update(
                diagnostics_row(
                    engine,
                    session.method,
                    step_batch,
                    loss_spec,
                    branch,
                    cache,
                    pad_id=session.tokenizer.pad_id,
                    micro_batch_size=spec.train.micro_batch_size,
                    max_samples=lg.diagnostics_samples,
                    null_draws=lg.diagnostics_null_draws,
                    sketch_dim=lg.diagnostics_sketch_dim,
                    conflict_ids=conflict_token_ids(session.tokenizer, lg.diagnostics_conflict_tokens),
                    seed=spec.train.seed * 1_000_003 + step,
                )
            )
        cache[branch] = step_batch  # the other branch's latest batch, for the next cross-branch diagnostics
    t1 = time.time()
    if float(signals.sample_weight.sum()) > 0:
        out = engine.train_step(batch, loss_spec)
    else:  # nothing selected (e.g. every sample failed scoring): no update, logged
        out = {"loss": float("nan"), "grad_norm": float("nan"), "skipped_update": True}
        session.engine.scheduler.step(increment=1)
    t_train = time.time() - t1
    row.update(step_row(step + 1, branch, samples, sig, signals, out, t_rollout, t_train), **overlap)
    if pipe is not None:  # served: the servers finish the batches of the old weights first
        row["rollout_wait_s"] += pipe.before_sync(step + 1)
    row.update(session.sampler.update_weights(step + 1))  # served rollout engines sample with the new weights
    return row


def train(spec) -> dict:
    """Run (or resume) training for `spec`; returns the last metrics row."""
    plan = plan_resume(spec)  # checkpoint.dir, the checkpoint's manifest and spec changes: before any model loads
    preempt = Preemption()
    session = open_session(spec, stop_requested=preempt.requested)
    pipe = None
    try:
        if session.method.balances_streams():
            balance_streams(session.collector, spec.method.uniopd, spec.data, spec.checkpoint.dir)
        start = _resume(session, plan)
        if session.is_logger and start == 0:
            write_model_meta(spec.checkpoint.dir, session.student_source.hf_config(), session.tokenizer.path)
        writer = MetricsWriter(
            spec.checkpoint.dir,
            spec.train.steps,
            start_step=start,
            enabled=session.is_logger,
            progress=spec.logging.progress,
            log_interval=spec.logging.log_interval,
            wandb_cfg=vars(spec.logging.wandb),
            run_config=spec.to_dict(),
        )
        loss_spec = _loss_spec(spec)
        cache: dict = {}
        row: dict = {"step": start}
        if spec.rollout.max_staleness > 0 and session.method.on_policy:
            pipe = RolloutPipeline(
                session.collector,
                session.engine,
                steps=spec.train.steps,
                start=start,
                resumed=session.resumed,
                snapshot=session.snapshot_sampler,
            )
        for step in range(start, spec.train.steps):
            row = (
                run_step(session, step, loss_spec, cache, pipe)
                if session.method.on_policy
                else sft_step(session, step, loss_spec)
            )
            writer.log(row)
            done = step + 1
            save_now = spec.checkpoint.save_interval and done % spec.checkpoint.save_interval == 0
            stop = preempt.agreed()
            if save_now or done == spec.train.steps or stop:
                e = session.engine
                state, files = _train_state(session), {}
                if pipe is not None and (inflight := pipe.checkpoint_state()):
                    entry, batches = inflight
                    state["rollouts_in_flight"] = entry
                    if batches is not None:  # rank 0 saves them inside the checkpoint
                        files[entry["file"]] = batches
                save_checkpoint(
                    spec.checkpoint.dir,
                    done,
                    e.models(),
                    e.optimizer,
                    e.scheduler,
                    state,
                    keep_last=spec.checkpoint.keep_last,
                    files=files,
                )
            if stop:
                row["preempted"] = True
                break
        writer.close()
        return row
    finally:
        if pipe is not None:
            pipe.close()
        session.close()


def sft_step(session: Session, step: int, loss_spec: LossSpec) -> dict:
    """Response-only cross-entropy on the reference answers of chat data (used to build domain teachers)."""
    from megatron_camopd.sft import sft_batch

    t0 = time.time()
    spec = session.spec
    batch, n_tokens = sft_batch(session.collector, step, spec.seq_length, spec.train.micro_batch_size)
    out = session.engine.train_step(batch, loss_spec)
    dt = time.time() - t0
    return {"step": step + 1, "branch": "sft", **out, "tokens_per_s": n_tokens / max(dt, 1e-9)}


def _parse(argv, prog: str):
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, applied before validation")
    return ap.parse_args(argv)


def train_main(argv: list[str]) -> int:
    args = _parse(argv, "camopd train")
    spec = load_spec(args.spec, args.overrides)
    row = train(spec)
    return EXIT_REQUEUE if row.get("preempted") else 0


def sft_main(argv: list[str]) -> int:
    args = _parse(argv, "camopd sft")
    spec = load_spec(args.spec, list(args.overrides) + ["method.name=sft"])
    row = train(spec)
    return EXIT_REQUEUE if row.get("preempted") else 0
