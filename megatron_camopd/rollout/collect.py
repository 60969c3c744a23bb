"""One step's data: draw prompts for the active branch, roll out, score with the routed teachers, verify.

Overlap (MOPD paper): with HTTP teachers a scoring request fires as soon as each rollout finishes, while the rest
of the batch is still generating; in-process teachers score the whole batch after generation (they share the
ranks). A sample whose scoring fails after the client's retries is kept with its error and dropped from the loss
(counted in metrics), never lost or duplicated silently.

Data parallel: every DP rank draws the same prompts (streams are deterministic), rolls out its contiguous slice,
and the scored samples are all-gathered so every rank sees the full step batch (selection and calibration are
batch-level); each rank then trains on its own slice. Other ranks' samples come without their top-k tensors
(per-sample scalars stand in for them: `rollout/dp_exchange.py`).

Served rollouts (`rollout.engine: sglang`), and every rollout of the overlapped pipeline (`rollout/pipeline.py`,
which reuses the pieces below: plan, slice, score, gather), carry the weight version they were sampled with;
`rollout/staleness.py` applies `rollout.max_staleness` / `on_stale` against this step. A stale sample dropped, or one
whose
rollout failed on every server, stays in the batch unscored with its reason (dropped from the loss, counted).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_camopd.algo.camopd import BranchSchedule
from megatron_camopd.config.sections import RolloutConfig, StreamConfig
from megatron_camopd.data.prompts import Prompt, PromptStream
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.data.verifiers import VERIFIER_NAMES, get_verifier
from megatron_camopd.errors import CamopdError, DataError, TeacherError
from megatron_camopd.rollout.assemble import dp_rows
from megatron_camopd.rollout.dp_exchange import exchange_samples
from megatron_camopd.rollout.sampler import Sampler
from megatron_camopd.rollout.sampling import Rollout, SamplingParams, sample_seed
from megatron_camopd.rollout.staleness import STALE_KEY, fail_if_stale, lag_of, stale_reason
from megatron_camopd.teachers.base import Teacher, TeacherScores

NOT_SCORED = "not_scored"  # Sample.meta key: why a sample was not sent to its teacher


@dataclass
class Sample:
    index: int  # position in the step batch
    group: int  # prompt index (Uni-OPD groups = the n samples of one prompt)
    branch: str  # general | domain | all
    prompt: Prompt
    teacher: str
    verifier: str | None
    rollout: Rollout | None = None
    scores: TeacherScores | None = None
    ref_lp: torch.Tensor | None = None
    reward: float | None = None
    error: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def generated(self) -> Rollout:
        """Its rollout, for the stages after generation."""
        if self.rollout is None:
            raise RuntimeError(f"sample {self.index}: read before its rollout was generated")
        return self.rollout


@dataclass
class Collector:
    """What collecting a step needs from the run, and nothing more: the spec's rollout section, routing, seed and
    the derived settings, plus the live pieces (streams, schedule, sampler, teachers). Built once per run by
    `Session.collector`; everything below takes it instead of the session."""

    rollout: RolloutConfig
    routing: dict[str, str]  # domain -> teacher name
    seed: int  # train.seed: per-sample rollout seeds
    http: frozenset[str]  # teachers scored over HTTP
    top_k: int | None  # teacher top-k per token (teacher_top_k)
    student_top1_k: int | None  # the method's top-1 check width: the DP exchange keeps what it needs
    params: SamplingParams
    tokenizer: Tokenizer
    sampler: Sampler
    streams: dict[str, list[tuple[StreamConfig, PromptStream]]]
    schedule: BranchSchedule
    teachers: dict[str, Teacher | None]  # an HTTP teacher is None off the model-parallel leader
    reference: Teacher | None
    dp_rank: int
    dp_size: int
    is_mp_leader: bool


def route(routing: dict[str, str], prompt: Prompt) -> str:
    """The teacher a prompt's domain is routed to (a row may carry its own domain label)."""
    try:
        return routing[prompt.domain]
    except KeyError:
        raise DataError(
            f"{prompt.source}: domain {prompt.domain!r} is not routed to a teacher "
            f"(routing has: {', '.join(sorted(routing))})"
        ) from None


def fail_if_teacher_down(samples: list[Sample], http: frozenset[str]) -> None:
    """A served teacher that failed EVERY sample of a step is down: stop with its error instead of training on
    nothing forever (single failures are dropped and counted). Checked on the gathered batch, so all ranks agree."""
    for name in sorted(http):
        mine = [s for s in samples if s.teacher == name and NOT_SCORED not in s.meta]
        if mine and all(s.error is not None for s in mine):
            raise TeacherError(
                f"teacher {name}: all {len(mine)} scoring requests of this step failed; first error: {mine[0].error}"
            )


def _unscorable(s: Sample, step: int, bound) -> bool:
    """Whether sample `s` gets no teacher scores: its rollout failed on every rollout server, or (served
    rollouts, `on_stale: drop`) it lags the trainer's step by more than max_staleness. Either way it stays in the
    batch with its reason as `error` (dropped from the loss, counted). Records the lag of versioned rollouts.
    `bound` holds max_staleness and on_stale (the spec's rollout section)."""
    r = s.generated
    if r.meta.get("error"):
        s.error, s.meta[NOT_SCORED] = f"rollout failed: {r.meta['error']}", "rollout"
        return True
    lag = lag_of(r, step)
    if lag is None:
        return False
    s.meta["stale_lag"] = lag
    why = stale_reason(s.index, r, step, bound.max_staleness) if bound.on_stale == "drop" else None
    if why:
        s.error, s.meta[NOT_SCORED], s.meta[STALE_KEY] = why, "stale", why
    return bool(why)


def largest_remainder(n: int, weights: list[float]) -> list[int]:
    total = sum(weights)
    raw = [n * w / total for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: out[i] - raw[i])[: n - sum(out)]:
        out[i] += 1
    return out


def draw_prompts(c: Collector, branch: str) -> list[tuple[Prompt, str, StreamConfig]]:
    """(prompt, branch, stream config) for one step; `branch` is general | domain | mixed | all."""
    n = c.rollout.prompts_per_step
    if branch == "mixed" and "general" in c.streams:
        wants = dict(zip(("general", "domain"), c.schedule.split(n)))
    elif branch == "mixed":
        wants = {"all": n}
    else:
        wants = {branch: n}
    out: list[tuple[Prompt, str, StreamConfig]] = []
    for b, count in wants.items():
        streams = c.streams.get(b, [])
        if count and not streams:
            raise CamopdError(f"no data stream for branch {b!r}")
        for (cfg, stream), k in zip(streams, largest_remainder(count, [sc.weight for sc, _ in streams])):
            out.extend((p, b, cfg) for p in stream.next_batch(k))
    return out


class _Loop:
    """A background asyncio loop for overlapping HTTP scoring with generation."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="camopd-overlap")
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def sampling_params(rollout: RolloutConfig, tokenizer) -> SamplingParams:
    """The spec's rollout sampling (the tokenizer's end-of-turn tokens always stop a response)."""
    r = rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=max(r.top_k, 0),
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=tuple(r.stop_token_ids) + tuple(tokenizer.stop_ids),
    )


def teacher_top_k(method_cfg, student_top1_k: int | None) -> int | None:
    """How many of each teacher's top log-probs a rollout token needs: the top-k loss's (`method.topk` with
    `method.loss: topk`), and the width the method checks the student's top-1 against (SelecTKD)."""
    k = method_cfg.topk if method_cfg.loss == "topk" else 0
    return max(k, student_top1_k or 0) or None


def _score_in_process(c: Collector, samples: list[Sample]) -> None:
    by_teacher: dict[str, list[Sample]] = {}
    for s in samples:
        by_teacher.setdefault(s.teacher, []).append(s)
    for name in sorted(by_teacher):
        group = by_teacher[name]
        teacher = c.teachers[name]
        assert teacher is not None, f"in-process teacher {name} exists on every rank"
        res = teacher.score_batch([s.generated.ids for s in group], [len(s.prompt.prompt_ids) for s in group], c.top_k)
        for s, r in zip(group, res):
            s.scores = r


def _share_over_model_parallel(samples: list[Sample]) -> None:
    """HTTP scores live on the model-parallel leader; give them to the other TP/PP ranks."""
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    obj = [[(s.scores, s.error) for s in samples]]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0), group=group)
    for s, (scores, err) in zip(samples, obj[0]):
        s.scores, s.error = scores, err


def plan_batch(c: Collector, branch: str) -> list[Sample]:
    """The step batch before rollout: prompts drawn (in step order) for `branch`, routed, n samples each."""
    drawn = draw_prompts(c, branch)
    n = c.rollout.n_samples
    assert n is not None, "the spec resolves rollout.n_samples from the method's default"
    return [
        Sample(
            index=g * n + j,
            group=g,
            branch=b,
            prompt=p,
            teacher=route(c.routing, p),
            verifier=(cfg.verifier if cfg.verifier != "none" else None),
        )
        for g, (p, b, cfg) in enumerate(drawn)
        for j in range(n)
    ]


def local_slice(c: Collector, samples: list[Sample]) -> list[Sample]:
    """This DP rank's contiguous slice of the step batch."""
    return [samples[i] for i in dp_rows(len(samples), c.dp_rank, c.dp_size)]


def http_teachers(teachers: dict) -> frozenset[str]:
    """The teachers (`teachers.<name>`) scored over HTTP: every kind but in-process `megatron`."""
    return frozenset(k for k, cfg in teachers.items() if cfg.kind != "megatron")


class HttpScoring:
    """Per-sample HTTP teacher scoring fired from `on_finish` as each rollout of `local` finishes (on the
    model-parallel leader); `collect()` waits for the answers (a failure is recorded per sample, counted)."""

    def __init__(self, c: Collector, step: int, local: list[Sample]) -> None:
        self.c, self.step, self.local = c, step, local
        self.futures: dict[int, concurrent.futures.Future] = {}
        self.loop = _Loop() if c.http and c.is_mp_leader else None

    def on_finish(self, i: int, rollout: Rollout) -> None:
        s = self.local[i]
        s.rollout = rollout
        if _unscorable(s, self.step, self.c.rollout):
            return
        if self.loop is not None and s.teacher in self.c.http:
            teacher = self.c.teachers[s.teacher]
            assert teacher is not None, "the model-parallel leader holds its HTTP teachers"
            self.futures[i] = self.loop.submit(teacher.score(rollout.ids, len(s.prompt.prompt_ids), self.c.top_k))

    def collect(self) -> None:
        if self.loop is None:
            return
        try:
            for i, fut in self.futures.items():
                try:
                    self.local[i].scores = fut.result()
                except Exception as exc:  # noqa: BLE001 -- recorded per sample, dropped from the loss, counted
                    self.local[i].error = f"{type(exc).__name__}: {exc}"
        finally:
            self.loop.close()
            self.loop = None


def score_local(c: Collector, local: list[Sample]) -> None:
    """After rollout: HTTP scores to the other model-parallel ranks, in-process teachers, the reference model,
    the verifiers (collective over the model-parallel group when it is larger than one rank)."""
    if c.http:
        _share_over_model_parallel([s for s in local if s.teacher in c.http])
    _score_in_process(c, [s for s in local if s.teacher not in c.http and NOT_SCORED not in s.meta])
    if c.reference is not None:
        refs = c.reference.score_batch([s.generated.ids for s in local], [len(s.prompt.prompt_ids) for s in local])
        for s, rs in zip(local, refs):
            s.ref_lp = rs.logprobs
    for s in local:
        if s.verifier:
            text = c.tokenizer.decode(s.generated.response_ids, skip_special_tokens=True)
            s.reward = float(get_verifier(VERIFIER_NAMES[s.verifier])(text, s.prompt.reference))


def gather_batch(c: Collector, step: int, local: list[Sample]) -> list[Sample]:
    """The full step batch on every rank (DP exchange), checked for stale rollouts and dead teachers."""
    if c.dp_size > 1:  # other ranks' samples arrive without top-k tensors (rollout/dp_exchange.py)
        local = exchange_samples(local, c.dp_rank, c.dp_size, ps.get_data_parallel_group(), c.student_top1_k)
    if c.rollout.on_stale == "error":
        fail_if_stale(local, step, c.rollout.max_staleness)
    fail_if_teacher_down(local, c.http)
    return sorted(local, key=lambda s: s.index)


def collect_step(c: Collector, step: int, branch: str) -> list[Sample]:
    """Roll out and score this step's batch; returns the full batch (all DP slices) on every rank."""
    local = local_slice(c, plan_batch(c, branch))
    scoring = HttpScoring(c, step, local)
    c.sampler.generate(
        [s.prompt.prompt_ids for s in local],
        c.params,
        [sample_seed(c.seed, step, s.index) for s in local],
        on_finish=scoring.on_finish,
    )
    scoring.collect()
    score_local(c, local)
    return gather_batch(c, step, local)
