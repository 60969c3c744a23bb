"""Everything a run holds, built from a validated spec: process groups, tokenizer, student engine, teachers,
prompt streams per branch, method and branch schedule.

`open_session(spec)` is the only place that reads the spec for set-up; the outer loop (loop/train.py) then works on
the `Session`. Teachers come in two kinds behind one interface: frozen Megatron models in process (checkpoint or
HF dir) and SGLang-protocol HTTP servers (urls or a launcher's discovery file); an HTTP teacher whose tokenizer
differs from the student's is refused here, before any training.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_camopd.algo.camopd import BranchSchedule
from megatron_camopd.algo.methods import Method, build_method, method_class
from megatron_camopd.backend.cpu_runtime import init_distributed
from megatron_camopd.backend.engine import Engine, build_chunks
from megatron_camopd.backend.model import ModelArch
from megatron_camopd.backend.model_source import ModelSource
from megatron_camopd.backend.settings import model_fields, optim_settings, teacher_dtype
from megatron_camopd.config import ExperimentSpec
from megatron_camopd.config.sections import StreamConfig
from megatron_camopd.data.prompts import PromptSource, PromptStream
from megatron_camopd.data.sandbox import ensure_available
from megatron_camopd.data.scan import routed_domains, scan_data
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.errors import TeacherError
from megatron_camopd.rollout.collect import Collector, http_teachers, sampling_params, teacher_top_k
from megatron_camopd.rollout.sampler import InProcessModel, Sampler, build_sampler, needs_entropy
from megatron_camopd.teachers.base import Teacher
from megatron_camopd.teachers.inprocess import MegatronTeacher

log = logging.getLogger("megatron_camopd")


@dataclass
class Session:
    """Everything one run holds, built once from the spec by `open_session` (collective over all ranks)."""

    spec: ExperimentSpec
    tokenizer: Tokenizer
    arch: ModelArch
    student_source: ModelSource
    engine: Engine  # the student under Megatron: forward/backward, optimizer, scheduler
    teachers: dict[str, Teacher | None]  # name -> scorer; an HTTP teacher is None off the model-parallel leader
    streams: dict[str, list[tuple[StreamConfig, PromptStream]]]  # branch ("general"|"domain"|"all") -> streams
    method: Method  # the algorithm; it declares what the loop must provide (algo/methods.py)
    schedule: BranchSchedule
    sampler: Sampler  # rollout.engine: every student rollout goes through it
    reference: MegatronTeacher | None = None  # a method's frozen reference model (needs_reference)
    resumed: tuple[Path, dict] | None = None  # (checkpoint, train_state) this run resumed from

    @property
    def dp_rank(self) -> int:
        return ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return ps.get_data_parallel_world_size()

    @property
    def is_mp_leader(self) -> bool:
        """First rank of its model-parallel group: talks to HTTP teachers, then shares the answers."""
        return _is_mp_leader()

    @property
    def is_logger(self) -> bool:
        return dist.get_rank() == 0

    @cached_property
    def collector(self) -> Collector:
        """The pieces step collection takes (rollout/collect.py), built once."""
        spec = self.spec
        return Collector(
            rollout=spec.rollout,
            routing=dict(spec.routing),
            seed=spec.train.seed,
            http=http_teachers(spec.teachers),
            top_k=teacher_top_k(spec.method, self.method.student_top1_k),
            student_top1_k=self.method.student_top1_k,
            params=sampling_params(spec.rollout, self.tokenizer),
            tokenizer=self.tokenizer,
            sampler=self.sampler,
            streams=self.streams,
            schedule=self.schedule,
            teachers=self.teachers,
            reference=self.reference,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            is_mp_leader=self.is_mp_leader,
        )

    def snapshot_sampler(self) -> tuple[list, Sampler]:
        """A second student instance (TP = PP = 1) and an in-process sampler over it, for rollouts generated on
        another thread while the student trains (rollout/pipeline.py); the trainer's RNG states are untouched."""
        from megatron.core import tensor_parallel

        from megatron_camopd.backend.engine import unwrap

        spec = self.spec
        tracker = tensor_parallel.get_cuda_rng_tracker()
        states = tracker.get_states()
        with torch.random.fork_rng(devices=[]):
            chunks, _ = build_chunks(self.arch, 1, 1, None, spec.model.dtype, None, **model_fields(spec.parallel))
        tracker.set_states(states)
        model = student_model(self.engine, self.arch, self.tokenizer, spec.seq_length)
        model = dataclasses.replace(model, chunks=[unwrap(c) for c in chunks])
        return chunks, build_sampler(self.sampler.engine, model, kv_cache_gb=spec.rollout.kv_cache_gb)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        for t in list(self.teachers.values()) + [self.reference]:
            if t is not None:
                t.close()


def method_params(spec: ExperimentSpec) -> dict:
    """The algorithm's constructor parameters from the spec's `method` section (declared by each method class)."""
    return method_class(spec.method.name).params(spec.method, spec.train.seed)


def stream_arguments(spec: ExperimentSpec) -> list[tuple[StreamConfig, dict, dict]]:
    """Per `data.streams` entry: (its config, PromptSource kwargs, PromptStream kwargs but the tokenizer)."""
    d = spec.data
    return [
        (
            s,
            dict(path=s.path, format=s.format, domain=s.domain, num_samples=s.limit),
            dict(
                max_prompt_len=d.max_prompt_tokens,
                overlong=d.overlong,
                on_bad_row=d.on_bad_row,
                seed=d.seed + 1009 * i,
                shuffle=d.shuffle,
                name=s.name,
                routed_domains=routed_domains(spec),
            ),
        )
        for i, s in enumerate(d.streams)
    ]


def _build_streams(spec: ExperimentSpec, tokenizer: Tokenizer) -> dict[str, list]:
    out: dict[str, list] = {}
    for s, source, kwargs in stream_arguments(spec):
        stream = PromptStream([PromptSource(**source)], tokenizer, **kwargs)
        out.setdefault(s.branch or "all", []).append((s, stream))
    return out


def _frozen_teacher(
    name: str, src: ModelSource, spec: ExperimentSpec, tokenizer: Tokenizer, student_arch: ModelArch
) -> MegatronTeacher:
    arch = src.arch()
    if arch.vocab_size != student_arch.vocab_size:
        raise TeacherError(
            f"teacher {name}: vocabulary size {arch.vocab_size} differs from the student's "
            f"{student_arch.vocab_size}; teachers must share the student's tokenizer"
        )
    p = spec.parallel
    dtype = teacher_dtype(spec, name) if name in spec.teachers else spec.model.dtype
    chunks, _ = build_chunks(arch, p.tp, p.pp, p.vpp, dtype)
    src.load_into(chunks, arch)
    tok_dir = src.config_dir
    if (tok_dir / "tokenizer.json").exists() or (tok_dir / "tokenizer_config.json").exists():
        theirs = Tokenizer.from_dir(tok_dir).fingerprint()
        if theirs != tokenizer.fingerprint():
            raise TeacherError(
                f"teacher {name}: tokenizer in {tok_dir} differs from the student's "
                f"({theirs[:12]} != {tokenizer.fingerprint()[:12]})"
            )
    return MegatronTeacher(
        name,
        chunks,
        arch,
        pad_id=tokenizer.pad_id,
        micro_batch_size=spec.train.micro_batch_size,
        source=str(src.config_dir),
        tokenizer_fingerprint=tokenizer.fingerprint(),
    )


def _http_teacher(name: str, cfg, spec: ExperimentSpec, tokenizer: Tokenizer, vocab_size: int):
    from megatron_camopd.teachers import teacher_client
    from megatron_camopd.teachers.tokcheck import TokenizerInfo, check_context, check_tokenizer, default_probe_ids

    teacher = teacher_client(cfg.server)(
        name,
        urls=cfg.urls,
        discovery_file=cfg.discovery_file,
        discovery_timeout_s=cfg.discovery_timeout_s,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
        max_in_flight=cfg.max_in_flight,
        dead_deadline_s=cfg.dead_deadline_s,
        seed=spec.train.seed,
    )
    hf_tok = tokenizer.hf
    info = TokenizerInfo.from_hf(hf_tok, tokenizer.path, model_vocab_size=vocab_size)  # config's, not len(tok)
    check_tokenizer(teacher, info, default_probe_ids(hf_tok))
    check_context(teacher, spec.seq_length, f"teachers.{name}.serve.context_length")
    return teacher


def student_tokenizer(spec: ExperimentSpec, tok_dir: Path) -> Tokenizer:
    """The student's tokenizer, rendering prompts with the chat-template variables of `model.chat_template_kwargs`."""
    return Tokenizer.from_dir(tok_dir, spec.model.chat_template_kwargs)


def open_session(spec: ExperimentSpec, stop_requested: Callable[[], bool] | None = None) -> Session:
    """Initialise distributed state and build everything the run needs (collective over all ranks).
    `stop_requested`: the trainer's preemption flag, which a served engine's weight sync honours mid-sync."""
    scan_data(spec)  # every data file, row by row: bad data stops here with file:line, before any model loads
    if any(stream.verifier == "code" for stream in spec.data.streams):
        ensure_available()  # model-written code never runs unconfined: refuse here, before any model loads
    p = spec.parallel
    init_distributed(p.tp, p.pp, p.vpp, seed=spec.train.seed)
    torch.manual_seed(spec.train.seed)
    student = ModelSource.resolve(spec.model.hf_path, spec.model.checkpoint, "model")
    tok_dir = Path(spec.model.tokenizer) if spec.model.tokenizer else student.config_dir
    tokenizer = student_tokenizer(spec, tok_dir)
    arch = student.arch()
    t = spec.train
    fp8 = p.fp8 if p.fp8.enabled else None
    engine = Engine(
        arch,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        dtype=spec.model.dtype,
        fp8=fp8,
        micro_batch_size=t.micro_batch_size,
        optim=optim_settings(spec),
        init_fn=lambda chunks: student.load_into(chunks, arch),
        model_fields=model_fields(p),
    )
    teachers: dict[str, Teacher | None] = {}
    method = build_method(spec.method.name, **method_params(spec))
    for name, cfg in spec.teachers.items() if method.needs_teachers else ():
        if cfg.kind == "megatron":
            teachers[name] = _frozen_teacher(
                name, ModelSource.resolve(cfg.hf_path, cfg.checkpoint, f"teachers.{name}"), spec, tokenizer, arch
            )
        else:
            teachers[name] = _http_teacher(name, cfg, spec, tokenizer, arch.vocab_size) if _is_mp_leader() else None
        log.info("teacher %s ready (%s%s)", name, cfg.kind, "" if cfg.kind == "megatron" else f", {cfg.server}")
    reference = None
    if method.needs_reference:
        ref_path = method.reference_path(spec.method)
        ref_src = ModelSource.resolve(ref_path, None, f"method.{method.name}") if ref_path else student
        reference = _frozen_teacher("reference", ref_src, spec, tokenizer, arch)
    schedule = branch_schedule(spec)
    r = spec.rollout
    sampler = build_sampler(
        r.engine,
        student_model(engine, arch, tokenizer, spec.seq_length),
        kv_cache_gb=r.kv_cache_gb,
        servers=r.servers,
        trainer=engine,
        seed=spec.train.seed,
        need_entropy=needs_entropy(method),
        model_dir=student.config_dir,
        tokenizer_dir=tok_dir,
        stop_requested=stop_requested,
    )
    return Session(
        spec=spec,
        tokenizer=tokenizer,
        arch=arch,
        student_source=student,
        engine=engine,
        teachers={k: v for k, v in teachers.items()},
        streams=_build_streams(spec, tokenizer),
        method=method,
        schedule=schedule,
        sampler=sampler,
        reference=reference,
    )


def branch_schedule(spec: ExperimentSpec) -> BranchSchedule:
    """The branch schedule of `schedule` (mix_ratio kept as given: [0.75, 0.25] is 3:1, never truncated)."""
    s = spec.schedule
    general, domain = s.mix_ratio or [1.0, 1.0]
    return BranchSchedule(mode=s.mode or "mixed", n_g=s.n_g, ratio=(general, domain))


def student_model(engine: Engine, arch: ModelArch, tokenizer: Tokenizer, max_context: int) -> InProcessModel:
    """The student's chunks as an in-process rollout engine sees them."""
    return InProcessModel(
        chunks=engine.chunks,
        groups=engine.groups,
        vocab_size=arch.vocab_size,
        max_context=max_context,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        micro_batch_size=engine.micro_batch_size,
    )


def _is_mp_leader() -> bool:
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
