"""Spec sections for what is trained on what: model, teachers, data streams, method, schedule, rollout.

Defaults are the papers' defaults (README "References": MOPD §3.2, CaMOPD arXiv:2605.27115 §3.3 and appendix A,
Uni-OPD §3). Fields whose default depends on the method
(`method.selection`, `schedule.mode`, `rollout.n_samples`) default to None here and are resolved by
`ExperimentSpec`, so the printed spec always shows the value in force.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from megatron_camopd.checks import Section, check, in_range, non_negative, path_field, positive, type_hints
from megatron_camopd.config.serving import SlurmResources, TeacherServeConfig

if TYPE_CHECKING:
    from megatron_camopd.algo.params import LossParams

Dtype = Literal["fp32", "bf16", "fp16"]
# the engines a served teacher may run on: the wire protocol its client speaks and what the launchers start
# (teachers/__init__.py: TEACHER_TRANSPORTS maps each to its client)
TeacherServer = Literal["sglang", "vllm"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelConfig(Section):
    """The student: a Hugging Face directory (config.json, tokenizer, safetensors) and/or a Megatron checkpoint."""

    hf_path: str | None = path_field()
    checkpoint: str | None = path_field()
    tokenizer: str | None = path_field()  # None: the tokenizer in hf_path
    # extra variables of the chat template when prompts are rendered, e.g. {enable_thinking: false} (Qwen3)
    chat_template_kwargs: dict[str, bool | int | str] = field(default_factory=dict)
    dtype: Dtype = "bf16"
    seq_length: int | None = None  # None: data.max_prompt_tokens + rollout.max_new_tokens

    def validate(self) -> None:
        check(self.hf_path is not None or self.checkpoint is not None, "hf_path", "give hf_path or checkpoint")
        positive(self, "seq_length")


@dataclass
class TeacherConfig(Section):
    """One frozen teacher: in-process Megatron (`checkpoint`/`hf_path`) or servers (`urls`/`discovery_file`) of
    the engine `server` names (SGLang, or vLLM's OpenAI-compatible server).

    With `serve`, `camopd sbatch`/`camopd launch` start the teacher's servers (model: `serve.model`, else
    `hf_path`/`checkpoint`) and point the trainer at them; a plain `camopd train` uses the other fields.
    """

    checkpoint: str | None = path_field()
    hf_path: str | None = path_field()
    urls: list[str] | None = None
    discovery_file: str | None = path_field()  # a launcher writes `host:port` lines here
    weight: float = 1.0  # alpha_k: scales this teacher's token rewards
    dtype: Dtype | None = None  # in-process weights / SGLang --dtype of served ones; None: model.dtype
    timeout_s: float = 600.0
    max_in_flight: int = 16
    retries: int = 3
    discovery_timeout_s: float = 3600.0  # how long to wait for the discovery file to list a server
    dead_deadline_s: float = 120.0  # all replicas down this long: the trainer stops with a TeacherError
    serve: TeacherServeConfig | None = None  # the launchers start this teacher's servers
    server: TeacherServer = "sglang"  # the engine of urls/discovery_file/serve: sglang | vllm

    @property
    def kind(self) -> Literal["megatron", "http", "discovery"]:
        """How the teacher is reached."""
        if self.urls is not None:
            return "http"
        if self.discovery_file is not None:
            return "discovery"
        return "megatron"

    def validate(self) -> None:
        given = [n for n in ("urls", "discovery_file") if getattr(self, n) is not None]
        in_process = self.checkpoint is not None or self.hf_path is not None
        check(
            len(given) + int(in_process) == 1,
            given[0] if given else "checkpoint",
            "give exactly one of checkpoint/hf_path (in-process), urls or discovery_file"
            + (f", got {', '.join(given + (['checkpoint/hf_path'] if in_process else []))}" if given else ""),
        )
        if self.urls is not None:
            check_urls(self.urls)
        positive(self, "weight", "timeout_s", "max_in_flight", "discovery_timeout_s", "dead_deadline_s")
        non_negative(self, "retries")
        check(
            self.dtype is None or in_process or self.serve is not None,
            "dtype",
            "applies to in-process (hf_path/checkpoint) or launcher-served (serve) teachers only",
        )
        check(
            self.server == "sglang" or not in_process or self.serve is not None,
            "server",
            f"{self.server!r} applies to served teachers (urls, discovery_file or serve); an in-process teacher"
            " runs in the trainer",
        )
        if self.serve is not None:
            check(self.urls is None, "serve", "urls name servers that already run: give urls or serve, not both")
            check(
                self.serve.model is not None or in_process,
                "serve.model",
                "name the model the launcher serves (an HF dir or a camopd checkpoint)",
            )
            check(
                self.serve.model is None or not in_process,
                "serve.model",
                "the launcher serves this teacher's hf_path/checkpoint; drop serve.model",
            )

    @property
    def served_model(self) -> str | None:
        """The model the launchers serve (None when the teacher has no `serve` section)."""
        if self.serve is None:
            return None
        return self.serve.model or self.hf_path or self.checkpoint


def check_urls(urls: list[str]) -> None:
    """A section's `urls`: at least one, each http(s)://host:port."""
    check(len(urls) > 0, "urls", "must list at least one server")
    for i, url in enumerate(urls):
        parsed = urllib.parse.urlparse(url)
        try:
            port = parsed.port
        except ValueError:  # not a number, or out of range
            port = None
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and port is not None
        check(ok, f"urls.{i}", f"must look like http://host:port, got {url!r}")


@dataclass
class StreamConfig(Section):
    """One prompt stream: a jsonl/parquet file of one format, routed by its domain, in one CaMOPD branch."""

    name: str
    path: str = path_field(dataclasses.MISSING)
    domain: str = dataclasses.field()  # type: ignore[misc]  # required: path's path_field(MISSING) is no default
    format: Literal["messages", "prompt", "nemotron", "coser", "medical_mc"] = "messages"
    branch: Literal["general", "domain"] | None = None  # CaMOPD/MOPD branch; None for branch-free methods
    weight: float = 1.0  # sampling weight among streams of the same branch
    verifier: Literal["none", "exact", "numeric", "multiple_choice", "code"] = "none"  # Uni-OPD outcome reward
    limit: int | None = None  # use at most this many rows

    def validate(self) -> None:
        check(bool(NAME_RE.match(self.name)), "name", f"must match {NAME_RE.pattern}, got {self.name!r}")
        check(self.path.endswith((".jsonl", ".parquet")), "path", "must be .jsonl or .parquet")
        check(bool(NAME_RE.match(self.domain)), "domain", f"must match {NAME_RE.pattern}, got {self.domain!r}")
        positive(self, "weight", "limit")


@dataclass
class DataConfig(Section):
    """The prompt streams and how prompts are cut to length."""

    streams: list[StreamConfig] = field(default_factory=list)
    max_prompt_tokens: int = 4096
    overlong: Literal["truncate", "skip"] = "truncate"  # truncate: keep the last max_prompt_tokens (latest turns)
    on_bad_row: Literal["error", "skip"] = "error"  # skip: drop malformed rows and count them
    seed: int = 1234
    shuffle: bool = True

    def validate(self) -> None:
        check(len(self.streams) > 0, "streams", "must list at least one stream")
        seen: set[str] = set()
        for i, stream in enumerate(self.streams):
            check(stream.name not in seen, f"streams.{i}.name", f"duplicate stream name {stream.name!r}")
            seen.add(stream.name)
        positive(self, "max_prompt_tokens")

    def branches(self) -> set[str]:
        """The CaMOPD branches the streams cover."""
        return {s.branch for s in self.streams if s.branch is not None}


@dataclass
class MethodConfig(Section):
    """The `method` section: `name` selects a registered method (algo/methods.py METHODS: camopd, mopd, uniopd,
    relaxed_opd, selectkd, ...); its other fields are what the registry declares, see `schema()`."""

    name: str

    @classmethod
    def schema(cls) -> type[MethodConfig]:
        """The section the loader builds: `name`, the shared loss settings (algo/params.py LossParams), then each
        registered method's own parameters in registration order, flat (CaMOPD's `method.rho_g`) or under
        `method.<key>` (`method.uniopd.delta_star`). One dataclass per set of registered methods."""
        from megatron_camopd.algo.methods import METHODS

        return _schema(tuple(METHODS.values()))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled by value: the schema class is made at run time (the registry of the unpickling process has the
        same methods when it imports the same plugins)."""
        return _rebuild, ({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},)

    def __getattr__(self, key: str) -> Any:
        """`spec.method.<key>` of a method whose parameters are flat (`spec.method.camopd`): those parameters."""
        if not key.startswith("_"):
            rec = _flat_records().get(key)
            if rec is not None:
                return rec.params(**{f.name: getattr(self, f.name) for f in dataclasses.fields(rec.params)})
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    @property
    def shared(self) -> LossParams:
        """The loss settings every method shares (algo/params.py LossParams)."""
        from megatron_camopd.algo.params import LossParams

        return LossParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossParams)})

    def method_class(self) -> Any:
        """The registered algorithm class of `name` (imported here, at validation: the algorithms need torch)."""
        from megatron_camopd.algo.methods import method_record

        return method_record(self.name).cls

    def validate(self) -> None:
        cls = self.method_class()
        self.shared  # noqa: B018  # builds LossParams: its checks
        for key in _flat_records():
            getattr(self, key)  # builds the flat parameters: their checks (nested sections checked themselves)
        cls.check_loss(self.loss)

    def resolve(self) -> None:
        """Fill method-dependent defaults (`method.selection`: the selected method's `default_selection`)."""
        from megatron_camopd.algo.methods import METHODS

        cls = self.method_class()
        for rec in METHODS.values():
            if rec.params is None:
                continue
            params = getattr(self, rec.key)
            params.resolve(cls)
            if rec.flat:
                for f in dataclasses.fields(params):
                    setattr(self, f.name, getattr(params, f.name))


def _flat_records() -> dict[str, Any]:
    from megatron_camopd.algo.methods import METHODS

    return {r.key: r for r in METHODS.values() if r.params is not None and r.flat}


def _rebuild(values: dict[str, Any]) -> MethodConfig:
    return MethodConfig.schema()(**values)


@functools.cache
def _schema(records: tuple[Any, ...]) -> type[MethodConfig]:
    from megatron_camopd.algo.params import LossParams

    def copied(section: type) -> list[tuple[str, Any, Any]]:
        hints = type_hints(section)
        return [
            (f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
            for f in dataclasses.fields(section)
        ]

    specs = copied(LossParams)
    for rec in records:
        if rec.params is not None:
            specs += copied(rec.params) if rec.flat else [(rec.key, rec.params, field(default_factory=rec.params))]
    namespace = {"__module__": __name__, "__qualname__": "MethodConfig", "__doc__": MethodConfig.__doc__}
    return dataclasses.make_dataclass("MethodConfig", specs, bases=(MethodConfig,), namespace=namespace)


@dataclass
class ScheduleConfig(Section):
    """Branch schedule: CaMOPD's alternating G x n_g, D or a mixed batch with a [general, domain] prompt ratio."""

    mode: Literal["alternate", "mixed"] | None = None  # None: alternate for camopd, else mixed
    n_g: int = 3
    mix_ratio: list[float] | None = None  # [general, domain] prompts per mixed step, e.g. [1, 1], [3, 1], [0.75, 0.25]

    def validate(self) -> None:
        positive(self, "n_g")
        if self.mix_ratio is not None:
            check(len(self.mix_ratio) == 2, "mix_ratio", f"must be [general, domain], got {self.mix_ratio!r}")
            check(
                all(r >= 0 for r in self.mix_ratio) and sum(self.mix_ratio) > 0,
                "mix_ratio",
                f"must be non-negative with a positive sum, got {self.mix_ratio!r}",
            )

    def split(self, n_prompts: int) -> tuple[int, int]:
        """(general, domain) prompts of a mixed step: general = round_half_up(n * g / (g + d)), exactly
        (`algo.camopd.BranchSchedule.split` computes the same numbers for training)."""
        g, d = (Fraction(r) for r in (self.mix_ratio or [1.0, 1.0]))
        n_general = math.floor(n_prompts * g / (g + d) + Fraction(1, 2))
        return n_general, n_prompts - n_general


@dataclass
class ServersConfig(Section):
    """Rollout servers of the student, whatever their engine (`rollout.sglang`, `rollout.vllm`): where they are, how
    the launcher starts them, and how the trainer's weights reach them after every optimizer step (how stale a
    rollout may be is `rollout.max_staleness`)."""

    urls: list[str] | None = None  # running servers; else the launcher starts them and writes discovery_file
    discovery_file: str | None = path_field()  # `host:port` lines written by the launcher
    nodes: int = 1  # launcher: nodes of rollout servers
    gpus_per_node: int = 8
    tp: int = 1  # --tp-size (SGLang) / --tensor-parallel-size (vLLM) of each server
    dp: int = 1  # --dp-size / --data-parallel-size of each server (distributed sync needs 1: more servers instead)
    # launcher: servers per node, each on its own tp * dp GPUs (--base-gpu-id) and port (port + i), each
    # joining the weights-update group with its own ranks (as slime/miles run engines); None: gpus_per_node // (tp*dp)
    servers_per_node: int | None = None
    mem_fraction_static: float = 0.8  # SGLang --mem-fraction-static / vLLM --gpu-memory-utilization
    # SGLang --context-length; None: the sequence length + 7 (SGLang 0.5.23 takes inputs of context - 7 tokens)
    context_length: int | None = None
    port: int = 30100
    extra_args: list[str] = field(default_factory=list)  # more `python -m sglang.launch_server` arguments
    env: dict[str, str] = field(default_factory=lambda: {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"})
    resources: SlurmResources = field(default_factory=SlurmResources)  # launcher: Slurm resources of the servers
    weight_sync: Literal["distributed", "disk"] = "distributed"
    sync_dir: str | None = path_field()  # disk sync: where HF weights are written; None: <checkpoint.dir>/weights
    # one weight-sync attempt, every wait included (store, group, broadcasts, answers); a preemption signal ends it
    sync_timeout_s: float = 600.0
    timeout_s: float = 3600.0  # one /generate request (a 32k-token response takes a while)
    max_in_flight: int = 256
    retries: int = 3
    discovery_timeout_s: float = 3600.0
    dead_deadline_s: float = 300.0

    @property
    def per_node(self) -> int:
        """Servers the launcher starts on each node."""
        return self.servers_per_node or max(1, self.gpus_per_node // (self.tp * self.dp))

    def validate(self) -> None:
        check(self.urls is None or self.discovery_file is None, "urls", "give urls or discovery_file, not both")
        if self.urls is not None:
            check_urls(self.urls)
        positive(
            self,
            "nodes",
            "gpus_per_node",
            "tp",
            "dp",
            "context_length",
            "servers_per_node",
            "sync_timeout_s",
            "timeout_s",
            "max_in_flight",
            "discovery_timeout_s",
            "dead_deadline_s",
        )
        check(
            self.tp * self.dp <= self.gpus_per_node,
            "dp",
            f"tp * dp = {self.tp * self.dp} GPUs per server, but gpus_per_node is {self.gpus_per_node}",
        )
        check(
            self.per_node * self.tp * self.dp <= self.gpus_per_node,
            "servers_per_node",
            f"{self.per_node} servers x tp * dp = {self.tp * self.dp} GPUs is more than gpus_per_node "
            f"({self.gpus_per_node})",
        )
        non_negative(self, "retries")
        in_range(self, "mem_fraction_static", 0.0, 1.0, low_open=True, high_open=True)
        in_range(self, "port", 1, 65535, low_open=False, high_open=False)


@dataclass
class RolloutServersConfig(ServersConfig):
    """SGLang rollout servers of the student (`rollout.engine: sglang`, rollout/sglang.py)."""

    # launcher: --enable-deterministic-inference, without which SGLang ignores sampling_seed (served rollouts then
    # do not reproduce across runs or a resume); SGLang offers it with GPU attention backends only, not on a CPU
    deterministic_inference: bool = True
    bucket_mb: int = 1024  # distributed sync: parameters per broadcast bucket

    def validate(self) -> None:
        super().validate()
        positive(self, "bucket_mb")


@dataclass
class VllmServersConfig(ServersConfig):
    """vLLM rollout servers of the student (`rollout.engine: vllm`, rollout/vllm.py): with `context_length` as
    vLLM's --max-model-len (None: the sequence length + 1) and `extra_args` of `python -m
    vllm.entrypoints.openai.api_server`; the weights are reloaded from disk, vLLM 0.32's one route on every
    platform (its network transfer is CUDA-only), and vLLM seeds every request by its `seed` (no flag needed)."""

    env: dict[str, str] = field(default_factory=dict)  # the launcher adds VLLM_SERVER_DEV_MODE=1 (the sync's routes)
    weight_sync: Literal["disk"] = "disk"  # vLLM 0.32: a reload from disk only
    port: int = 30200


@dataclass
class RolloutConfig(Section):
    """Student sampling per step, and the engine that does it (see rollout/sampler.py)."""

    engine: str = "megatron"  # a registered engine (engines.py): megatron | sglang | vllm | reference | ...
    kv_cache_gb: float = 16.0  # megatron engine: KV cache budget per rank; larger batches are split
    sglang: RolloutServersConfig = field(default_factory=RolloutServersConfig)
    vllm: VllmServersConfig = field(default_factory=VllmServersConfig)
    prompts_per_step: int = 512
    n_samples: int | None = None  # responses per prompt; None: 16 for uniopd (its group size n), else 1
    temperature: float = 1.0  # 0: greedy (every engine picks the argmax; log-probs stay at temperature 1)
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 32768
    stop_token_ids: list[int] = field(default_factory=list)
    # rollouts of step t + k are sampled while step t trains, with weights k versions old (rollout/pipeline.py);
    # 0: on-policy, generate then train. Also the bound on a served rollout's weight_version lag.
    max_staleness: int = 0
    on_stale: Literal["error", "drop"] = "error"  # beyond max_staleness: stop, or drop the sample and count it

    def validate(self) -> None:
        from megatron_camopd.engines import ENGINES, unknown_engine  # the registry imports nothing heavy

        check(self.engine in ENGINES, "engine", unknown_engine(self.engine))
        positive(self, "prompts_per_step", "n_samples", "max_new_tokens", "kv_cache_gb")
        non_negative(self, "temperature")
        non_negative(self, "max_staleness")
        in_range(self, "top_p", 0.0, 1.0, low_open=True, high_open=False)
        check(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k!r}")
