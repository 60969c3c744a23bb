"""The on-policy distillation loop (and SFT), one short file.

    for each step:  branch = schedule.next()                     (G,G,G,D,... or mixed)
                    samples = collect_step(...)                  (prompts -> rollouts -> teacher scores)
                    signals = method.prepare(signal_batch(...))  (gaps, selection, calibration)
                    engine.train_step(my DP slice, loss)         (Megatron forward/backward + optimizer)
                    metrics row, checkpoint, preemption check

Resume: `checkpoint.resume: auto` continues from the newest checkpoint whose manifest verifies (model, optimizer,
LR schedule, branch-schedule position, data positions, method state, RNG); a resumed CPU run reproduces the
uninterrupted loss curve bit for bit. Spec changes since the checkpoint are reported, then applied or refused
(loop/resume.py). On SIGUSR1/SIGTERM (Slurm's warning before the time limit) the loop checkpoints after
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

import torch
import torch.distributed as dist

from megatron_camopd.backend.checkpoint import write_model_meta
from megatron_camopd.backend.forward import comm_device
from megatron_camopd.backend.loss import LossSpec
from megatron_camopd.config import ExperimentSpec, load_spec
from megatron_camopd.loop.metrics import MetricsWriter
from megatron_camopd.loop.resume import plan_resume
from megatron_camopd.loop.session import Session, open_session
from megatron_camopd.loop.sft import sft_step
from megatron_camopd.loop.state import resume, save
from megatron_camopd.loop.steprow import Diagnostics, step_row
from megatron_camopd.rollout.assemble import StepBatch, signal_batch
from megatron_camopd.rollout.collect import collect_step
from megatron_camopd.rollout.offline import balance_streams
from megatron_camopd.rollout.pipeline import RolloutPipeline
from megatron_camopd.rollout.staleness import staleness_metrics

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


def _loss_spec(spec: ExperimentSpec) -> LossSpec:
    m = spec.method
    return LossSpec(
        loss=m.method_class().loss_kind(m.loss),
        is_weight=m.is_weight,
        eps_low=m.eps_low,
        eps_high=m.eps_high,
        is_cap=m.is_cap,
    )


def run_step(
    session: Session, step: int, loss_spec: LossSpec, diag: Diagnostics, pipe: RolloutPipeline | None = None
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
    row = diag.row(engine, session.method, step_batch, loss_spec, branch, step)
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


def train(spec: ExperimentSpec) -> dict:
    """Run (or resume) training for `spec`; returns the last metrics row."""
    plan = plan_resume(spec)  # checkpoint.dir, the checkpoint's manifest and spec changes: before any model loads
    preempt = Preemption()
    session = open_session(spec, stop_requested=preempt.requested)
    pipe = None
    try:
        if session.method.balances_streams():
            balance_streams(session.collector, spec.method.uniopd, spec.data, spec.checkpoint.dir)
        start = resume(session, plan)
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
        diag = Diagnostics(
            spec.logging,
            session.schedule,
            spec.train.seed,
            pad_id=session.tokenizer.pad_id,
            micro_batch_size=spec.train.micro_batch_size,
            tokenizer=session.tokenizer,
        )
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
            on_policy = session.method.on_policy
            row = run_step(session, step, loss_spec, diag, pipe) if on_policy else sft_step(session, step, loss_spec)
            writer.log(row)
            done = step + 1
            save_now = spec.checkpoint.save_interval and done % spec.checkpoint.save_interval == 0
            stop = preempt.agreed()
            if save_now or done == spec.train.steps or stop:
                save(session, done, pipe)
            if stop:
                row["preempted"] = True
                break
        writer.close()
        return row
    finally:
        if pipe is not None:
            pipe.close()
        session.close()


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
