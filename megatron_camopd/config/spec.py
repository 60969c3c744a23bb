"""`ExperimentSpec`: the whole experiment, with the checks that span sections and the method-dependent defaults.

Cross-section rules: routing names defined teachers and routes every stream's domain; CaMOPD (and any alternating
schedule) needs a general and a domain stream; a mixed schedule over branches needs `mix_ratio`, and every branch
it gives a share gets at least one prompt per step; Uni-OPD groups need n_samples >= 2 and a verifier per stream;
the model's sequence length holds a prompt plus a rollout, and so does every served model's context length; the
launcher's world size is a multiple of tp * pp (and equals tp * pp * dp when dp is given); the servers the launcher
starts listen on distinct ports, and rollout servers synced over a weights-update group have dp = 1. What depends
on the rollout engine is asked of its entry in the engine registry (engines.py: served or in process, its
servers section, its server checks, e.g. `check_sglang_servers`). All of it is checked here, before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_camopd.checks import Section, check
from megatron_camopd.config.run_sections import (
    CheckpointConfig,
    LauncherConfig,
    LoggingConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_camopd.config.sections import (
    NAME_RE,
    DataConfig,
    MethodConfig,
    ModelConfig,
    RolloutConfig,
    ScheduleConfig,
    TeacherConfig,
)
from megatron_camopd.config.serving import (
    SGLANG_INPUT_RESERVE,
    SGLANG_VERSION,
    VLLM_INPUT_RESERVE,
    context_for_inputs,
    vllm_model_len_for_inputs,
)

if TYPE_CHECKING:
    from megatron_camopd.engines import EngineInfo

TEACHER_PORT_BASE = 30000  # served teachers without serve.port listen on 30000, 30001, ... in spec order


@dataclass
class ExperimentSpec(Section):
    """A complete, validated experiment. Build it with `load_spec`; print it with `dump_yaml`."""

    name: str
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    checkpoint: CheckpointConfig
    description: str = ""
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    routing: dict[str, str] = field(default_factory=dict)  # domain -> teacher name
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig | None = None  # None: a local (non-Slurm) run

    def validate(self) -> None:
        check(bool(NAME_RE.match(self.name)), "name", f"must match {NAME_RE.pattern}, got {self.name!r}")
        self._resolve_defaults()
        self._check_teachers()
        self._check_branches()
        self._check_method()
        self._check_lengths()
        self._check_parallel()
        self._check_rollout()
        self._check_serving()

    def _resolve_defaults(self) -> None:
        self.method.resolve()
        method = self.method.method_class()
        if self.schedule.mode is None:
            self.schedule.mode = method.default_schedule
        if self.rollout.n_samples is None:
            self.rollout.n_samples = method.default_n_samples
        if self.logging.wandb.run_name is None:
            self.logging.wandb.run_name = self.name
        served = self.rollout_servers
        disk = getattr(served, "weight_sync", "disk") == "disk"
        if served is not None and disk and hasattr(served, "sync_dir") and served.sync_dir is None:
            served.sync_dir = f"{self.checkpoint.dir.rstrip('/')}/weights"  # HF weights the servers load each step

    def _check_teachers(self) -> None:
        for teacher in self.teachers:
            check(bool(NAME_RE.match(teacher)), f"teachers.{teacher}", f"teacher names must match {NAME_RE.pattern}")
        for domain, teacher in self.routing.items():
            check(
                teacher in self.teachers,
                f"routing.{domain}",
                f"teacher {teacher!r} is not defined (teachers: {', '.join(sorted(self.teachers)) or 'none'})",
            )
        if not self.method.method_class().needs_teachers:
            return
        check(len(self.teachers) > 0, "teachers", f"method {self.method.name!r} needs at least one teacher")
        for i, stream in enumerate(self.data.streams):
            check(
                stream.domain in self.routing,
                f"data.streams.{i}.domain",
                f"domain {stream.domain!r} is not routed to a teacher (add routing.{stream.domain})",
            )

    def _check_branches(self) -> None:
        streams = self.data.streams
        with_branch = [s.branch is not None for s in streams]
        if any(with_branch) and not all(with_branch):
            i = with_branch.index(False)
            check(False, f"data.streams.{i}.branch", "give every stream a branch (general|domain) or none")
        branches = self.data.branches()
        needs_both = self.method.method_class().needs_both_branches
        if needs_both or self.schedule.mode == "alternate":
            why = self.method.name if needs_both else "the alternate schedule"
            for branch in ("general", "domain"):
                check(branch in branches, "data.streams", f"{why} needs a stream with branch: {branch}")
        if self.schedule.mode == "mixed" and branches:
            check(
                self.schedule.mix_ratio is not None,
                "schedule.mix_ratio",
                "a mixed schedule over general/domain streams needs mix_ratio: [general, domain]",
            )
            for branch, ratio in zip(("general", "domain"), self.schedule.mix_ratio or [0, 0], strict=True):
                check(ratio == 0 or branch in branches, "schedule.mix_ratio", f"no stream has branch: {branch}")
        if self.schedule.mix_ratio is not None:
            check(bool(branches), "schedule.mix_ratio", "needs streams with branch: general|domain")
        if self.schedule.mode == "mixed" and branches and self.schedule.mix_ratio is not None:
            n = self.rollout.prompts_per_step
            for branch, ratio, count in zip(
                ("general", "domain"), self.schedule.mix_ratio, self.schedule.split(n), strict=True
            ):
                check(
                    ratio == 0 or count > 0,
                    "schedule.mix_ratio",
                    f"{self.schedule.mix_ratio} gives the {branch} branch 0 of rollout.prompts_per_step = {n} "
                    "prompts per step",
                )

    def _check_method(self) -> None:
        if self.method.method_class().needs_outcome_groups(self.method):
            name = self.method.name
            check(
                self.rollout.n_samples is not None and self.rollout.n_samples >= 2,
                "rollout.n_samples",
                f"{name}'s groups need n_samples >= 2, got {self.rollout.n_samples}",
            )
            for i, stream in enumerate(self.data.streams):
                check(
                    stream.verifier != "none",
                    f"data.streams.{i}.verifier",
                    f"{name}'s outcome groups need an outcome verifier for every stream",
                )

    def _check_lengths(self) -> None:
        need = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if self.model.seq_length is not None:
            check(
                self.model.seq_length >= need,
                "model.seq_length",
                f"must hold data.max_prompt_tokens + rollout.max_new_tokens = {need}, got {self.model.seq_length}",
            )

    def _check_parallel(self) -> None:
        if self.launcher is None:
            return
        world, mp = self.launcher.world_size, self.parallel.model_parallel_size
        check(world % mp == 0, "parallel.tp", f"launcher world size {world} is not a multiple of tp*pp = {mp}")
        if self.parallel.dp is not None:
            check(
                self.parallel.dp * mp == world,
                "parallel.dp",
                f"tp*pp*dp = {self.parallel.dp * mp} must equal the launcher world size {world}",
            )

    @property
    def rollout_engine(self) -> EngineInfo:
        """The registry entry of `rollout.engine` (engines.py, imported here: it imports nothing heavy)."""
        from megatron_camopd.engines import engine_info

        return engine_info(self.rollout.engine)

    @property
    def rollout_servers(self) -> Any | None:
        """The servers section of a served `rollout.engine` (`rollout.sglang` for sglang); None in process."""
        info = self.rollout_engine
        return getattr(self.rollout, info.servers) if info.servers else None

    def _check_rollout(self) -> None:
        from megatron_camopd.engines import names

        r, info = self.rollout, self.rollout_engine
        served = " | ".join(names(served=True)) or "a served engine"
        if not info.interleaved_pp:
            check(
                self.parallel.vpp is None,
                "rollout.engine",
                f"engine {r.engine} does not support interleaved pipelining (parallel.vpp); use engine: "
                f"{' | '.join(names(interleaved_pp=True))}",
            )
        if r.max_staleness > 0 and not info.served:
            mp = (self.parallel.tp, self.parallel.pp, self.parallel.vpp)
            check(
                mp == (1, 1, None),
                "rollout.max_staleness",
                f"overlapping in-process rollouts (rollout.engine: {r.engine}) with training needs parallel.tp = "
                f"parallel.pp = 1 and no vpp (the generating thread's collectives would interleave with the "
                f"trainer's), got tp={mp[0]}, pp={mp[1]}, vpp={mp[2]}: use rollout.engine: {served}, or "
                f"rollout.max_staleness: 0",
            )
            check(
                not self.parallel.fp8.enabled,
                "rollout.max_staleness",
                f"overlapping in-process rollouts (rollout.engine: {r.engine}) with training cannot run under "
                "parallel.fp8: TransformerEngine's FP8 scaling state is process-wide, shared by the snapshot model "
                f"the rollout thread samples with and the trainer, which update it at once; use rollout.engine: "
                f"{served}, or rollout.max_staleness: 0",
            )
        servers = self.rollout_servers
        if servers is not None:
            check(
                servers.urls is not None or servers.discovery_file is not None or self.launcher is not None,
                info.where,
                f"engine {r.engine} needs urls or discovery_file (or a launcher section that starts the servers)",
            )
            check(
                servers.urls is not None or servers.discovery_file is not None or info.launch is not None,
                info.where,
                f"engine {r.engine} has no launcher of its servers: give urls or discovery_file",
            )

    def teacher_port(self, name: str) -> int:
        """The port the launchers start teacher `name`'s servers on (`serve.port`, else 30000 + its position)."""
        serve = self.teachers[name].serve
        if serve is not None and serve.port is not None:
            return serve.port
        return TEACHER_PORT_BASE + list(self.teachers).index(name)

    def _check_serving(self) -> None:
        ports: dict[int, str] = {}
        for name, teacher in self.teachers.items():
            if teacher.serve is None:
                continue
            where = f"teachers.{name}.serve"
            ctx = teacher.serve.context_length
            need = context_for_inputs(self.seq_length)
            check(
                ctx is None or ctx >= need,
                f"{where}.context_length",
                f"must be >= {need}: the teacher scores a prompt plus a rollout ({self.seq_length} tokens) and "
                f"SGLang {SGLANG_VERSION} takes inputs of at most context_length - {SGLANG_INPUT_RESERVE} tokens; "
                f"got {ctx}",
            )
            port = self.teacher_port(name)
            check(port not in ports, f"{where}.port", f"port {port} is already used by {ports.get(port)}")
            ports[port] = where
        servers, info = self.rollout_servers, self.rollout_engine
        if servers is not None and servers.urls is None:  # the launcher starts them
            check(
                servers.port not in ports,
                f"{info.where}.port",
                f"port {servers.port} is already used by {ports.get(servers.port)}",
            )
            if info.checks is not None:
                from megatron_camopd.engines import resolve

                resolve(info.checks)(self, servers)

    @property
    def seq_length(self) -> int:
        """The model's sequence length in force (the derived default when model.seq_length is null)."""
        return self.model.seq_length or self.data.max_prompt_tokens + self.rollout.max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML-ready data (round-trips through `load_spec`)."""
        data = dataclasses.asdict(self)
        order = [
            "name",
            "description",
            "model",
            "teachers",
            "routing",
            "data",
            "method",
            "schedule",
            "rollout",
            "train",
            "parallel",
            "checkpoint",
            "logging",
            "launcher",
        ]
        return {key: data[key] for key in order}


def check_sglang_servers(spec: ExperimentSpec, servers: Any) -> None:
    """The `sglang` engine's checks of the rollout servers a launcher starts (`rollout.sglang`, no urls): their
    context holds a full sample, and a distributed weight sync has servers of dp = 1."""
    need = max(spec.seq_length, context_for_inputs(spec.data.max_prompt_tokens))
    check(
        servers.context_length is None or servers.context_length >= need,
        "rollout.sglang.context_length",
        f"must be >= {need}: it holds a prompt plus a rollout ({spec.seq_length} tokens), and SGLang "
        f"{SGLANG_VERSION} takes prompts of at most context_length - {SGLANG_INPUT_RESERVE} tokens; "
        f"got {servers.context_length}",
    )
    check(
        servers.weight_sync != "distributed" or servers.dp == 1,
        "rollout.sglang.dp",
        f"weight_sync: distributed needs servers with dp = 1 (SGLang joins the weights-update group as "
        f"rank_offset + tp_rank), got dp = {servers.dp}: set rollout.sglang.dp=1 (several servers per "
        "node: rollout.sglang.servers_per_node) or rollout.sglang.weight_sync=disk",
    )


def check_vllm_servers(spec: ExperimentSpec, servers: Any) -> None:
    """The `vllm` engine's checks of the rollout servers a launcher starts (`rollout.vllm`, no urls): vLLM's
    --max-model-len holds a full sample."""
    need = max(spec.seq_length, vllm_model_len_for_inputs(spec.data.max_prompt_tokens))
    check(
        servers.context_length is None or servers.context_length >= need,
        "rollout.vllm.context_length",
        f"must be >= {need}: vLLM's --max-model-len holds a prompt plus a rollout ({spec.seq_length} tokens) "
        f"and takes prompts of at most max_model_len - {VLLM_INPUT_RESERVE} tokens; got {servers.context_length}",
    )
