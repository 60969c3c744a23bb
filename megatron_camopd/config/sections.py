"""Spec sections for what is trained on what: model, teachers, data streams, method, schedule, rollout.

Defaults are the papers' defaults (README "References": MOPD §3.2, CaMOPD arXiv:2605.27115 §3.3 and appendix A,
Uni-OPD §3). Fields whose default depends on the method
(`method.selection`, `schedule.mode`, `rollout.n_samples`) default to None here and are resolved by
`ExperimentSpec`, so the printed spec always shows the value in force.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from megatron_camopd.config.fields import Section, check, in_range, non_negative, path_field, positive
from megatron_camopd.config.serving import SlurmResources, TeacherServeConfig

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
            check(len(self.urls) > 0, "urls", "must list at least one server")
            for i, url in enumerate(self.urls):
                parsed = urllib.parse.urlparse(url)
                ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and _has_port(parsed)
                check(ok, f"urls.{i}", f"must look like http://host:port, got {url!r}")
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


def _has_port(parsed: urllib.parse.ParseResult) -> bool:
    try:
        return parsed.port is not None
    except ValueError:
        return False


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
class UniOPDConfig(Section):
    """Uni-OPD: outcome-guided margin calibration and data balancing (Uni-OPD §3.3-§3.4)."""

    calibration: Literal["shift", "mask", "none"] = "shift"
    delta_star: float = 0.4
    scope: Literal["group", "global"] = "group"
    margin_mode: Literal["mean", "minmax"] = "mean"
    shift: Literal["spread", "lift", "suppress"] = "spread"
    mask_min_frac: float = 0.25  # greedy margin mask keeps at least max(1, floor(frac * n_side))
    online_balance: bool = True
    balance_ratio: float = 1.0  # target correct:incorrect ratio within a group
    offline_balance: bool = False
    offline_n: int = 8  # rollouts per prompt in the offline pass
    offline_shape: Literal["auto", "u", "mirrored_j"] = "auto"
    offline_factor: int = 2  # upsampling factor of the selected prompts
    # upsample prompts whose pass count is in [offline_low, offline_high]; None: the shape's own bounds,
    # [1, N-1] for u (intermediate difficulty) and [0, N-1] for mirrored_j (every prompt not always solved)
    offline_low: int | None = None
    offline_high: int | None = None  # None: offline_n - 1

    def validate(self) -> None:
        positive(self, "delta_star", "balance_ratio", "offline_n", "offline_factor")
        in_range(self, "mask_min_frac", 0.0, 1.0, low_open=True, high_open=False)
        non_negative(self, "offline_low")
        high = self.offline_n - 1 if self.offline_high is None else self.offline_high
        low = 0 if self.offline_low is None else self.offline_low
        check(low <= high <= self.offline_n, "offline_high", "need offline_low <= offline_high <= offline_n")


@dataclass
class RelaxedConfig(Section):
    """Relaxed OPD (REOPOLD): reward floor log(lam/(1-lam)) and entropy top-beta token sampling."""

    lam: float = 0.2
    beta: float = 0.5

    def validate(self) -> None:
        in_range(self, "lam", 0.0, 1.0, low_open=True, high_open=True)
        in_range(self, "beta", 0.0, 1.0, low_open=True, high_open=False)


@dataclass
class SelecTKDConfig(Section):
    """SelecTKD: accept a token when the student's top-1 is in the teacher's top-k; rejected tokens weigh beta."""

    k: int = 5
    beta: float = 0.01

    def validate(self) -> None:
        positive(self, "k")
        in_range(self, "beta", 0.0, 1.0, low_open=False, high_open=False)


@dataclass
class ExOPDConfig(Section):
    """ExOPD (G-OPD): A = lam (log pi_T - log pi_ref) - (log pi_s - log pi_ref)."""

    lam: float = 1.25
    reference: str | None = path_field()  # None: the initial student

    def validate(self) -> None:
        positive(self, "lam")


@dataclass
class MethodConfig(Section):
    """The distillation method and its loss, clipping, importance weighting and CaMOPD selection parameters."""

    name: str  # a registered method (algo/methods.py METHODS): camopd, mopd, uniopd, relaxed_opd, selectkd, ...
    loss: Literal["pg", "topk"] = "pg"
    a_max: float | None = 5.0  # two-sided advantage clip; null = no clip
    is_weight: Literal["mask", "truncate", "none"] = "mask"
    eps_low: float = 0.5
    eps_high: float = 5.0
    is_cap: float = 2.0  # C of truncated IS
    topk: int = 16
    selection: bool | None = None  # gap-based mass-target selection; None: on for camopd
    # which k_b samples selection keeps: "gap" (the paper's top-gap prefix) or "random" (as many, at random: the
    # ablation of which samples are chosen at the same kept fraction)
    selection_order: Literal["gap", "random"] = "gap"
    rho_g: float = 0.8
    rho_d: float = 0.8
    r_g: float = 2.0
    r_d: float = 1.0
    uniopd: UniOPDConfig = field(default_factory=UniOPDConfig)
    relaxed: RelaxedConfig = field(default_factory=RelaxedConfig)
    selectkd: SelecTKDConfig = field(default_factory=SelecTKDConfig)
    exopd: ExOPDConfig = field(default_factory=ExOPDConfig)

    def method_class(self) -> Any:
        """The registered algorithm class of `name` (imported here, at validation: the algorithms need torch)."""
        from megatron_camopd.algo.methods import METHODS

        close = difflib.get_close_matches(str(self.name), sorted(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(sorted(METHODS))}"
        check(self.name in METHODS, "name", f"unknown method {self.name!r}{hint}")
        return METHODS[self.name]

    def validate(self) -> None:
        cls = self.method_class()
        positive(self, "a_max", "eps_high", "is_cap", "r_g", "r_d")
        non_negative(self, "eps_low", "topk")
        check(
            self.eps_low <= self.eps_high, "eps_low", f"must be <= eps_high ({self.eps_high!r}), got {self.eps_low!r}"
        )
        check(self.loss != "topk" or self.topk >= 1, "topk", f"the topk loss needs topk >= 1, got {self.topk!r}")
        in_range(self, "rho_g", 0.0, 1.0, low_open=True, high_open=False)
        in_range(self, "rho_d", 0.0, 1.0, low_open=True, high_open=False)
        check(
            self.loss in cls.loss_forms,
            "loss",
            f"{self.name} trains with loss {' or '.join(map(repr, cls.loss_forms))}, got {self.loss!r}",
        )

    def resolve(self) -> None:
        """Fill method-dependent defaults."""
        if self.selection is None:
            self.selection = self.method_class().default_selection


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
            check(len(self.urls) > 0, "urls", "must list at least one server")
            for i, url in enumerate(self.urls):
                parsed = urllib.parse.urlparse(url)
                ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and _has_port(parsed)
                check(ok, f"urls.{i}", f"must look like http://host:port, got {url!r}")
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


SERVED_ENGINES = ("sglang", "vllm")  # rollout engines on servers: weights synced per step, detached generation


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

    engine: Literal["megatron", "sglang", "vllm", "reference"] = "megatron"
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

    @property
    def servers(self) -> ServersConfig:
        """The rollout servers section of the engine in force (`rollout.vllm` for vllm, else `rollout.sglang`)."""
        return self.vllm if self.engine == "vllm" else self.sglang

    def validate(self) -> None:
        positive(self, "prompts_per_step", "n_samples", "max_new_tokens", "kv_cache_gb")
        non_negative(self, "temperature")
        non_negative(self, "max_staleness")
        in_range(self, "top_p", 0.0, 1.0, low_open=True, high_open=False)
        check(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k!r}")
