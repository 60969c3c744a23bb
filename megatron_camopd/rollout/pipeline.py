"""Rollouts overlapped with training (`rollout.max_staleness: k > 0`): the batch of step t + k is sampled while
step t trains, with the weights of version t -- k optimizer steps old when it is trained on.

Schedule (deterministic, whatever the timing): the batch of step s is sampled with weight version
`max(base, s - k)` (base: the step the pipeline started at without batches in flight, 0 for a fresh run), so
every sample lags the trainer by exactly min(s - base, k) <= k versions. At the start of step t (weights of
version t current) the main thread launches every batch up to step t + k: it draws the prompts in step order
(the branch schedule decides the stream before generation), and, for in-process engines, takes a copy of the
version-t parameters. One generating thread (FIFO) samples each batch with the per-sample seeds of its step (as
`collect_step` does), stamps every rollout with `meta["weight_version"]` and fires HTTP teacher scoring as samples
finish; with a model-parallel group of one rank it also scores with in-process teachers, the reference model and
the verifiers (they only read the tokens). The main thread then waits for step t's batch, finishes what needs
collectives (model-parallel sharing, the DP exchange), and trains; the importance weight uses each sample's own
sampled log-probs (the generating version's), and gap scores and selection see the batch as generated.

Engines (served or in process: the registry's word, engines.py): a served one (`sglang`, `vllm`) samples on the
servers through its `ServedSampler.generate_detached` (no collective on the generating thread: the model-parallel
leader alone talks HTTP; results are broadcast on the main thread), and before the weight sync of version t + 1 the
trainer waits until the servers finished every batch of version t, so no sample mixes versions. In-process ones
(`megatron`, `reference`) sample on a second model instance on the generating thread, loaded with the copied
parameters of the job's version; that needs TP = PP = 1 (collectives from two threads would interleave; refused by
the spec check), and costs one more copy of the parameters per batch in flight plus the snapshot model.

Metrics per step: `rollout_wait_s` (the trainer waited for its batch and, served, for the servers to finish with
the old weights before the sync), `weight_wait_s` (the generating side sat idle until its next batch's weights
existed), and `rollout_staleness_max` / `_mean` (from each sample's weight_version, `staleness.py`).

Checkpoints: at a save, batches in flight are drained (generated and scored) and their rollouts -- prompts,
tokens, sampled log-probs, versions -- are saved by rank 0 inside the checkpoint (`iter_N/inflight_rollouts.pt`,
named in `train_state.json` and covered by the manifest, so a corrupted file is refused like any other); the
prompt streams and branch schedule are saved past them. A resumed run re-enters those batches (scored again from
their tokens: deterministic) instead of sampling them, so it reproduces the uninterrupted loss curve bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_camopd.engines import engine_info
from megatron_camopd.errors import CheckpointError
from megatron_camopd.rollout.collect import (
    Collector,
    HttpScoring,
    Sample,
    _unscorable,
    gather_batch,
    local_slice,
    plan_batch,
    score_local,
)
from megatron_camopd.rollout.sampler import Sampler, ServedSampler
from megatron_camopd.rollout.sampling import sample_seed
from megatron_camopd.rollout.staleness import staleness_metrics

log = logging.getLogger("megatron_camopd")
INFLIGHT_FILE = "inflight_rollouts.pt"  # inside the checkpoint directory


@dataclass
class Job:
    step: int
    branch: str
    version: int
    samples: list[Sample]  # the whole step batch (prompts); rollouts only in `local`
    local: list[Sample]  # this DP rank's slice
    weights: list[torch.Tensor] | None = None  # in-process engines: the version's parameters
    restored: bool = False  # rollouts from a checkpoint: score them, do not sample
    launched_at: float = 0.0
    weight_wait_s: float = 0.0
    rollouts: list | None = None  # served: what the model-parallel leader got back
    gen_done: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None


_ROLLOUT_THREAD = threading.local()


def _thread_init(device: int | None) -> None:
    """Set up the generating thread: CUDA's current device is per thread (a new thread starts on device 0, so
    every rank's rollouts would land on cuda:0), so it takes the device of the thread that created the pipeline."""
    from megatron_camopd.backend.cpu_runtime import activate_cpu_runtime

    if device is not None:
        torch.cuda.set_device(device)
    activate_cpu_runtime()  # torch function modes are per thread
    _ROLLOUT_THREAD.active = True


def rollout_executor() -> ThreadPoolExecutor:
    """The pipeline's one generating thread, on the calling thread's CUDA device (none on CPU)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return ThreadPoolExecutor(1, thread_name_prefix="camopd-rollouts", initializer=_thread_init, initargs=(device,))


class _ThreadRoutedRngTracker:
    """megatron-core's layers look up one process-wide CUDA RNG tracker, whose `fork()` swaps the generator's
    state and checks, on exit, a `_current_state_name` it keeps in itself: a forward on the generating thread
    (snapshot model, in-process teachers) interleaved with the trainer's raced it ("current state name
    default-rng is not the same as ..."). Installed while a pipeline runs, this routes the generating thread to
    an inference tracker (megatron-core's own for inference: `fork()` does nothing; nothing there draws from the
    generator: no dropout at inference, sampling uses per-sample generators) and every other thread to the
    training tracker, unchanged."""

    def __init__(self, training) -> None:
        self._training = training
        self._inference = _InferenceRngTracker()

    def __getattr__(self, name: str):
        tracker = self._inference if getattr(_ROLLOUT_THREAD, "active", False) else self._training
        return getattr(tracker, name)


class _InferenceRngTracker(tensor_parallel.random.CudaRNGStatesTracker):
    """As megatron-core's `InferenceCudaRNGStatesTracker`: adds, sets and forks nothing."""

    def __init__(self) -> None:
        super().__init__(is_inference_rng_tracker=True)

    def add(self, name, seed) -> None:
        pass

    def set_states(self, states) -> None:
        pass

    def fork(self, name: str = "model-parallel-rng"):
        return contextlib.nullcontext()


def _route_rng_tracker():
    """Install the thread-routed tracker; returns the one it replaced (restored by `close`)."""
    mrandom = tensor_parallel.random
    training = mrandom.get_cuda_rng_tracker()
    mrandom._CUDA_RNG_STATE_TRACKER = _ThreadRoutedRngTracker(training)
    return training


class RolloutPipeline:
    """The k-step-off rollout pipeline of one training run (see the module docstring). `c`: what collection
    needs (rollout/collect.py); `engine`: the training engine (its parameters and optimizer step count);
    `snapshot`: for in-process engines, builds the second student instance and its sampler."""

    def __init__(
        self,
        c: Collector,
        engine,
        *,
        steps: int,
        start: int,
        resumed: tuple[Path, dict] | None = None,
        snapshot: Callable[[], tuple[list, Sampler]] | None = None,
    ) -> None:
        self.c, self.engine, self.k, self.steps = c, engine, c.rollout.max_staleness, steps
        self.served = engine_info(c.sampler.engine).served  # the registry's word (engines.py)
        self._server = cast(ServedSampler, c.sampler)  # served: detached generation, sharing, sync
        self.mp_size = dist.get_world_size(ps.get_model_parallel_group())
        self.jobs: dict[int, Job] = {}
        self.base = self.next = start
        self._prev_gen_end: float | None = None
        self._pool = rollout_executor()
        self._rng_tracker = _route_rng_tracker()
        try:
            if self.served:
                self._server.ensure_synced()
            else:
                if snapshot is None:
                    raise ValueError("an in-process rollout pipeline needs a snapshot model")
                self._snapshot_model(snapshot)
            entry = resumed[1].get("rollouts_in_flight") if resumed else None
            if entry and resumed is not None:
                self._restore(resumed[0], entry, start)
        except BaseException:
            self.close()  # the caller never gets the pipeline to close: release the thread and the tracker here
            raise

    # ------------------------------------------------------------------ in-process engines
    def _snapshot_model(self, snapshot: Callable[[], tuple[list, Sampler]]) -> None:
        """A second student instance the generating thread samples with (the trainer's RNG left untouched)."""
        chunks, self._gen = snapshot()
        self._live = [p for c in self.engine.models() for p in c.parameters()]
        self._snap = [p for c in chunks for p in c.parameters()]
        names = [n for c in self.engine.models() for n, _ in c.named_parameters()]
        if names != [n for c in chunks for n, _ in c.named_parameters()]:
            raise RuntimeError("snapshot model's parameters differ from the student's")

    def _copy_weights(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [p.detach().clone() for p in self._live]

    # ------------------------------------------------------------------ launching and generating
    def version_of(self, step: int) -> int:
        return max(self.base, step - self.k)

    def launch(self, upto: int) -> None:
        """Main thread: launch the batches of steps up to `upto` (prompts drawn now, in step order)."""
        current = int(self.engine.scheduler.num_steps)
        while self.next <= min(upto, self.steps - 1):
            s = self.next
            version = self.version_of(s)
            if version != current:  # cannot happen by construction; a loud stop beats a silent off-by-one
                raise RuntimeError(f"rollout pipeline: step {s} wants weights {version}, trainer holds {current}")
            branch = self.c.schedule.next()
            samples = plan_batch(self.c, branch)
            job = Job(
                step=s,
                branch=branch,
                version=version,
                samples=samples,
                local=local_slice(self.c, samples),
                launched_at=time.time(),
                weights=None if self.served else self._copy_weights(),
            )
            self._submit(job)
            self.next += 1

    def _submit(self, job: Job) -> None:
        self.jobs[job.step] = job
        job.future = self._pool.submit(self._work, job)

    def _work(self, job: Job) -> None:
        """Generating thread: sample (or re-enter) the job's slice and score what needs no collective."""
        c = self.c
        if self._prev_gen_end is not None:
            job.weight_wait_s = max(0.0, job.launched_at - self._prev_gen_end)
        scoring = HttpScoring(c, job.step, job.local)
        try:
            if job.restored:
                for i, smp in enumerate(job.local):
                    scoring.on_finish(i, smp.generated)
                job.rollouts = [smp.generated for smp in job.local]
            else:
                seeds = [sample_seed(c.seed, job.step, smp.index) for smp in job.local]
                prompts = [smp.prompt.prompt_ids for smp in job.local]
                if self.served:
                    job.rollouts = self._server.generate_detached(prompts, c.params, seeds, on_finish=scoring.on_finish)
                else:
                    assert job.weights is not None, "an in-process job carries its weight snapshot"
                    with torch.no_grad():
                        for dst, src in zip(self._snap, job.weights):
                            dst.copy_(src)
                    job.weights = None

                    def stamped(i: int, rollout) -> None:
                        rollout.meta["weight_version"] = str(job.version)
                        scoring.on_finish(i, rollout)

                    job.rollouts = self._gen.generate(prompts, c.params, seeds, on_finish=stamped)
        finally:
            self._prev_gen_end = time.time()
            job.gen_done.set()
            scoring.collect()
        if self.mp_size == 1:
            score_local(c, job.local)

    # ------------------------------------------------------------------ the trainer's side
    def batch(self, step: int) -> tuple[str, list[Sample], dict[str, float]]:
        """Main thread: step `step`'s full batch (launching what the schedule allows first) and its metrics."""
        self.launch(step + self.k)
        job = self.jobs.pop(step)
        t0 = time.time()
        error = None
        try:
            assert job.future is not None, "a step's job is launched before its batch is taken"
            job.future.result()
        except Exception as exc:  # noqa: BLE001 -- shared with the model-parallel group, then raised everywhere
            if self.mp_size == 1:
                raise
            error = f"{type(exc).__name__}: {exc}"
        wait = time.time() - t0
        if self.mp_size > 1:  # served only (the spec check): the leader's rollouts reach the whole group
            rollouts = self._server.share(job.rollouts, error)
            for smp, r in zip(job.local, rollouts):
                if smp.rollout is None:
                    smp.rollout = r
                    _unscorable(smp, step, self.c.rollout)
            score_local(self.c, job.local)
        if self.served:
            self._server.fill_entropy([smp.rollout for smp in job.local if smp.rollout is not None])  # all, here
        samples = gather_batch(self.c, step, job.local)
        metrics = {"rollout_wait_s": wait, "weight_wait_s": job.weight_wait_s, **staleness_metrics(samples, step)}
        return job.branch, samples, metrics

    def before_sync(self, version: int) -> float:
        """Main thread, served engines: wait until the servers finished every batch sampled with weights older
        than `version` (so the sync never lands mid-batch); returns the seconds waited."""
        if not self.served:
            return 0.0
        t0 = time.time()
        for job in self.jobs.values():
            if job.version < version:
                job.gen_done.wait()
        return time.time() - t0

    # ------------------------------------------------------------------ checkpoints
    def drain(self) -> None:
        for job in self.jobs.values():
            job.gen_done.wait()
            try:
                if job.future is not None:
                    job.future.result()
            except Exception:  # noqa: BLE001 -- raised again when the step takes the batch
                pass

    def checkpoint_state(self) -> tuple[dict, list | None] | None:
        """Collective: drain; the train_state entry and (rank 0) the in-flight batches to save inside the
        checkpoint as INFLIGHT_FILE; None when nothing is in flight."""
        self.drain()
        if not self.jobs:
            return None
        mine = {
            st: {smp.index: smp.rollout for smp in job.local if smp.rollout is not None}
            for st, job in self.jobs.items()
        }
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        out = None
        if dist.get_rank() == 0:
            out = []
            for st in sorted(self.jobs):
                job = self.jobs[st]
                got = {i: r for part in every for i, r in part.get(st, {}).items()}
                missing = [smp.index for smp in job.samples if smp.index not in got]
                if missing:
                    raise CheckpointError(f"step {st}: in-flight samples {missing[:4]} have no rollout to save")
                out.append(
                    {
                        "step": st,
                        "branch": job.branch,
                        "version": job.version,
                        "samples": [
                            dataclasses.replace(
                                smp, rollout=got[smp.index], scores=None, ref_lp=None, reward=None, error=None, meta={}
                            )
                            for smp in job.samples
                        ],
                    }
                )
        return {"file": INFLIGHT_FILE, "steps": sorted(self.jobs), "max_staleness": self.k}, out

    def _restore(self, ckpt: Path, entry: dict, start: int) -> None:
        path = Path(ckpt) / entry["file"]  # its bytes were verified against the manifest before any model loaded
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: its in-flight rollouts {path} are missing (train_state.json names them)")
        try:
            jobs = torch.load(path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 -- an unreadable file is a checkpoint error, never a traceback
            raise CheckpointError(f"{path}: unreadable in-flight rollouts ({type(exc).__name__}: {exc})") from None
        if [j["step"] for j in jobs] != list(range(start, start + len(jobs))):
            raise CheckpointError(f"{path}: in-flight steps {[j['step'] for j in jobs]} do not follow step {start}")
        for j in jobs:
            job = Job(
                step=j["step"],
                branch=j["branch"],
                version=j["version"],
                samples=j["samples"],
                local=local_slice(self.c, j["samples"]),
                restored=True,
                launched_at=time.time(),
            )
            self._submit(job)
        self.next = start + len(jobs)
        self.base = min([start] + [j["version"] for j in jobs])
        if jobs and self.next - self.k > self.base:
            self.base = self.next - self.k  # the next launch uses the trainer's current weights
        log.info("resumed %d rollout batches in flight from %s", len(jobs), path)

    def close(self) -> None:
        mrandom = tensor_parallel.random
        for job in self.jobs.values():
            if job.future is not None:
                job.future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(mrandom._CUDA_RNG_STATE_TRACKER, _ThreadRoutedRngTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = self._rng_tracker
