"""What a checkpoint holds beyond the weights, and the two moves that use it: `save` after a step, `resume` before
the first one.

The training state is JSON (`train_state.json`, written by backend/checkpoint.py): the resolved spec (resume
compares it with the new one, loop/resume.py), the branch schedule's position, every data stream's position and
the method's own state. With one-step-off rollouts, the batches in flight at the save go into the checkpoint too,
so a resumed run trains on exactly the rollouts the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_camopd.backend.checkpoint import load_checkpoint, save_checkpoint
from megatron_camopd.errors import CheckpointError
from megatron_camopd.loop.resume import ResumePlan
from megatron_camopd.loop.session import Session
from megatron_camopd.rollout.pipeline import RolloutPipeline

log = logging.getLogger("megatron_camopd")


def train_state(session: Session) -> dict:
    """The JSON training state of `session` at a step boundary."""
    state = {
        "spec": session.spec.to_dict(),
        "schedule": session.schedule.state_dict(),
        "streams": {cfg.name: s.state_dict() for streams in session.streams.values() for cfg, s in streams},
    }
    method_state = session.method.state_dict()
    if method_state:
        state["method"] = method_state
    return state


def restore(session: Session, state: dict) -> None:
    """Put the schedule, data streams and method back where `state` (a checkpoint's train_state) left them."""
    session.schedule.load_state_dict(state["schedule"])
    for streams in session.streams.values():
        for cfg, s in streams:
            if cfg.name not in state["streams"]:
                raise CheckpointError(f"checkpoint has no position for data stream {cfg.name!r}")
            s.load_state_dict(state["streams"][cfg.name])
    if "method" in state:
        session.method.load_state_dict(state["method"])


def resume(session: Session, plan: ResumePlan) -> int:
    """Load the checkpoint `plan` chose (already verified by plan_resume) into the session; the step to start at."""
    if plan.path is None:
        return 0
    e = session.engine
    ck = session.spec.checkpoint
    state = load_checkpoint(
        plan.path, e.models(), e.optimizer, e.scheduler, verify=False, fully_parallel=ck.fully_parallel
    )
    restore(session, state)
    session.resumed = (Path(plan.path), state)  # rollouts in flight re-enter the pipeline (rollout/pipeline.py)
    log.info("resumed from %s at step %d", plan.path, state["step"])
    return int(state["step"])


def save(session: Session, done: int, pipe: RolloutPipeline | None) -> None:
    """Collective: checkpoint the run after `done` steps (`checkpoint.dir`, keeping `checkpoint.keep_last`),
    the rollout batches in flight included."""
    e, ck = session.engine, session.spec.checkpoint
    state, files = train_state(session), {}
    if pipe is not None and (inflight := pipe.checkpoint_state()):
        entry, batches = inflight
        state["rollouts_in_flight"] = entry
        if batches is not None:  # rank 0 saves them inside the checkpoint
            files[entry["file"]] = batches
    save_checkpoint(
        ck.dir,
        done,
        e.models(),
        e.optimizer,
        e.scheduler,
        state,
        keep_last=ck.keep_last,
        files=files,
        optimizer_format=ck.optimizer_format,
        fully_parallel=ck.fully_parallel,
    )
