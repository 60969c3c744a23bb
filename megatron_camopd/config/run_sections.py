"""Spec sections for how a run executes: optimisation, parallelism/FP8, checkpoints, logging and the launcher.

Defaults follow the CaMOPD paper (120 steps, lr 2e-6, 4 nodes x 8 H100) and megatron-core conventions.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from megatron_camopd.checks import Section, check, in_range, non_negative, path_field, positive
from megatron_camopd.config.serving import SlurmResources

SLURM_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


@dataclass
class TrainConfig(Section):
    """Optimiser and LR schedule; one optimiser step per training step (on-policy)."""

    steps: int = 120
    seed: int = 1234
    micro_batch_size: int = 1
    lr: float = 2e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0: no clipping
    distributed_optimizer: bool = False
    # DDP: reduce (reduce-scatter with the distributed optimizer) each gradient bucket over DP as soon as the last
    # micro-batch's backward has produced it, overlapping the communication with the rest of the backward.
    # Off by default: tested equal to the synchronous reduction at DP=2 and at PP=2 x DP=2 with the distributed
    # optimizer (tests/train/test_overlap_grad_reduce.py; TP=2 x DP=2 measured equal too), not yet on a GPU
    # (megatron-core asserts on a parameter left without a gradient); the flagship spec turns it on
    overlap_grad_reduce: bool = False

    def validate(self) -> None:
        positive(self, "steps", "micro_batch_size", "lr", "adam_eps")
        non_negative(self, "min_lr", "warmup_steps", "weight_decay", "clip_grad")
        check(self.min_lr <= self.lr, "min_lr", f"must be <= lr ({self.lr!r}), got {self.min_lr!r}")
        check(
            self.warmup_steps <= self.steps, "warmup_steps", f"must be <= steps ({self.steps}), got {self.warmup_steps}"
        )
        in_range(self, "adam_beta1", 0.0, 1.0, low_open=False, high_open=True)
        in_range(self, "adam_beta2", 0.0, 1.0, low_open=False, high_open=True)


@dataclass
class FP8Config(Section):
    """TransformerEngine FP8 (GPU only; imported lazily when enabled)."""

    enabled: bool = False
    format: Literal["e4m3", "hybrid"] = "hybrid"
    recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"

    def validate(self) -> None:
        non_negative(self, "margin")
        positive(self, "amax_history_len")


@dataclass
class ParallelConfig(Section):
    """Megatron model parallelism; dp is derived from the world size (or checked against it when given)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B)
    dp: int | None = None
    sequence_parallel: bool = False  # TransformerConfig.sequence_parallel (TransformerEngine layer spec)
    # activation recomputation: full = recompute_granularity "full", method "uniform", 1 layer per unit;
    # selective = recompute only `recompute_modules` of every layer
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_modules: list[Literal["core_attn", "mlp", "layernorm"]] | None = None  # selective; None: ["mlp"]
    fp8: FP8Config = field(default_factory=FP8Config)
    # TransformerConfig.gradient_accumulation_fusion: weight gradients accumulated into the fp32 grad buffer by
    # the GEMM itself (TransformerEngine's linears; Apex's fused_weight_gradient_mlp_cuda for the output layer).
    # None: on where that kernel is importable (NGC GPU images), off elsewhere; true: required
    gradient_accumulation_fusion: bool | None = None

    def validate(self) -> None:
        positive(self, "tp", "pp", "dp")
        check(self.vpp is None or self.vpp >= 2, "vpp", f"must be null or >= 2, got {self.vpp!r}")
        check(self.vpp is None or self.pp >= 2, "vpp", f"interleaved pipelining needs pp >= 2, got pp={self.pp}")
        check(not self.sequence_parallel or self.tp > 1, "sequence_parallel", "needs tp > 1")
        if self.recompute_modules is not None:
            check(
                self.recompute == "selective",
                "recompute_modules",
                f"applies to recompute: selective only (recompute is {self.recompute!r})",
            )
            check(len(self.recompute_modules) > 0, "recompute_modules", "must list at least one module")
        if self.fp8.enabled and self.fp8.recipe == "delayed" and "layernorm" in self.selective_modules:
            check(
                False,
                "recompute_modules",
                "layernorm recompute does not work with FP8 delayed scaling "
                "(megatron-core refuses it); drop it or use fp8.recipe: tensorwise|blockwise",
            )

    @property
    def selective_modules(self) -> list[str]:
        """The modules selective recompute recomputes (empty unless recompute is selective)."""
        if self.recompute != "selective":
            return []
        return list(self.recompute_modules or ["mlp"])

    @property
    def model_parallel_size(self) -> int:
        """Ranks per model replica (tp * pp)."""
        return self.tp * self.pp


@dataclass
class CheckpointConfig(Section):
    """Megatron dist_checkpointing directory (metrics.jsonl and the resolved spec live here too)."""

    dir: str = path_field(dataclasses.MISSING)
    save_interval: int = 20  # steps; 0: only at the end
    keep_last: int | None = 2  # null: keep all
    resume: str = path_field("auto", keep=("auto", "never"))  # auto | never | a checkpoint path
    # The distributed optimizer's state in a checkpoint (backend/checkpoint_format.py): fully_reshardable gathers
    # a replica's whole optimizer state on every DP rank at each save (12 bytes a parameter of the TP x PP shard,
    # host memory) and reshards over TP/PP/DP; dp_reshardable writes each rank's own shard, no gather, and
    # reshards over DP only (a resume at another TP/PP/VPP is refused). Recorded in the checkpoint; a resume may
    # change it (the load reads the recorded format). No effect without train.distributed_optimizer
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    # megatron-core's fully parallel save/load over the DP group: tensors all DP ranks hold (weights,
    # fully_reshardable optimizer state) are written by one rank each, spread evenly, not all by DP rank 0, and
    # read once then broadcast. Tested bitwise against the plain save at DP=2 (tests/train/test_checkpoint_scale.py)
    fully_parallel: bool = True

    def validate(self) -> None:
        non_negative(self, "save_interval")
        positive(self, "keep_last")


@dataclass
class WandbConfig(Section):
    """Weights & Biases logging (imported lazily when enabled)."""

    enabled: bool = False
    project: str = "megatron-camopd"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    run_name: str | None = None  # None: the spec's name

    def validate(self) -> None:
        check(not (self.enabled and self.mode == "disabled"), "mode", "is 'disabled' but enabled is true")


@dataclass
class LoggingConfig(Section):
    """Console progress, metrics cadence, wandb and the opt-in gradient diagnostics."""

    log_interval: int = 1
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    diagnostics: bool = False  # gradient dot/cosine/coherence: extra backward passes
    # every k-th step *of each branch* (counted per branch from diagnostics_start, algo/diagnostics.py
    # diagnostics_due), so an alternating G,G,G,D run visits both branches whatever k is
    diagnostics_interval: int = 10
    diagnostics_interval_domain: int | None = None  # the domain branch's k (null: diagnostics_interval)
    diagnostics_start: int = 1  # first step diagnosed (1 skips step 0, where the student is the domain teacher)
    # coherence/GCG from per-sample gradients (one backward each) of at most this many rollouts per branch and
    # rank (the first ones of the branch in the step's batch); null = every rollout
    diagnostics_samples: int | None = None
    diagnostics_null_draws: int = 200  # random subsets of the selected size: GCG's null distribution
    # per-sample gradients enter the Gram matrix exactly up to this many entries per rank, as a CountSketch of
    # this width beyond (memory: diagnostics_samples x width x 4 bytes)
    diagnostics_sketch_dim: int = 1 << 21
    # strings whose tokens in a general rollout (absent from a domain rollout) mark a sample that carries the
    # cross-branch conflict: the diagnostics then log the selection's precision and recall against that label
    diagnostics_conflict_tokens: list[str] | None = None

    def validate(self) -> None:
        positive(
            self,
            "log_interval",
            "diagnostics_interval",
            "diagnostics_interval_domain",
            "diagnostics_samples",
            "diagnostics_null_draws",
            "diagnostics_sketch_dim",
        )
        non_negative(self, "diagnostics_start")
        check(
            not self.diagnostics_conflict_tokens or all(self.diagnostics_conflict_tokens),
            "diagnostics_conflict_tokens",
            "must be non-empty strings",
        )


# The trainer's environment on GPU clusters (Megatron-LM / NeMo examples). Cluster-specific NCCL settings
# (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_SL, ...) go in launcher.trainer_env as well.
DEFAULT_TRAINER_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron-core's TP/SP communication overlap needs in-order kernels
    "NCCL_IB_TIMEOUT": "19",  # InfiniBand retry timeout (4.096 us * 2^19 ~ 2 s): survive transient link flaps
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
}


@dataclass
class LauncherConfig(Section):
    """Slurm: the trainer's nodes and resources, job-wide settings and the launchers' timings. Servers the launcher
    starts are configured where they belong: `teachers.<name>.serve` and `rollout.sglang`."""

    nodes: int = 4
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # memory of one GPU (H100 80 GB); `camopd plan` checks its estimate against it
    partition: str | None = None
    account: str | None = None
    time: str = "08:00:00"
    topology: Literal["hetjob", "dependency"] = "hetjob"
    log_dir: str | None = path_field()  # None: <checkpoint.dir>/logs
    python: str | None = None  # the python of every component (with megatron_camopd); None: the one rendering
    # the python of the SGLang servers (SGLang has an environment of its own on most clusters); None: `python`
    sglang_python: str | None = None
    # the python of the vLLM servers (`teachers.<name>.server: vllm`; `python -m megatron_camopd.launch.vllm_env`
    # builds one on a CPU machine); None: `python`
    vllm_python: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # environment of every component
    trainer_env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TRAINER_ENV))  # NCCL/IB, CUDA
    resources: SlurmResources = field(default_factory=SlurmResources)  # the trainer's nodes
    # Slurm's pre-timeout signal (--signal=B:USR1@lead): the trainer checkpoints after its current step, so the
    # lead must cover one step plus a checkpoint save (a paper-scale CaMOPD step takes ~15-20 min)
    signal_lead_s: int = 1800
    shutdown_timeout_s: int = 240  # torchrun's grace for the ranks after a signal (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
    health_timeout_s: int = 1800  # servers must answer /health this soon after start (model loading)
    # one /health request: SGLang's /health runs a one-token generation (1-20 s on a busy server)
    health_check_timeout_s: float = 30.0
    teacher_dead_s: int = 300  # a teacher without a healthy server this long stops the training
    watch_interval_s: int = 30  # health watchdog period

    def validate(self) -> None:
        positive(
            self,
            "nodes",
            "gpus_per_node",
            "gpu_memory_gb",
            "shutdown_timeout_s",
            "health_timeout_s",
            "health_check_timeout_s",
            "teacher_dead_s",
            "watch_interval_s",
        )
        check(bool(SLURM_TIME_RE.match(self.time)), "time", f"must be a Slurm time like 08:00:00, got {self.time!r}")
        in_range(self, "signal_lead_s", 1, 65535, low_open=False, high_open=False)  # Slurm's --signal limit
        check(
            self.signal_lead_s < slurm_seconds(self.time),
            "signal_lead_s",
            f"must be shorter than the job's time limit {self.time} ({slurm_seconds(self.time)} s)",
        )
        check(
            self.health_check_timeout_s < self.teacher_dead_s,
            "health_check_timeout_s",
            f"must be shorter than teacher_dead_s ({self.teacher_dead_s})",
        )

    @property
    def world_size(self) -> int:
        """Training GPUs."""
        return self.nodes * self.gpus_per_node


def slurm_seconds(text: str) -> int:
    """Seconds in a Slurm time string (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`); `text` matches SLURM_TIME_RE."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0, 0])[:3]
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s
