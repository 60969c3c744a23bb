"""Spec sections for how a run executes: optimisation, parallelism/FP8, checkpoints, logging and the launcher.

Defaults follow the CaMOPD paper (120 steps, lr 2e-6, 4 nodes x 8 H100) and megatron-core conventions.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from megatron_camopd.config.fields import Section, check, in_range, non_negative, path_field, positive

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

    def validate(self) -> None:
        positive(self, "steps", "micro_batch_size", "lr", "adam_eps")
        non_negative(self, "min_lr", "warmup_steps", "weight_decay", "clip_grad")
        check(self.min_lr <= self.lr, "min_lr", f"must be <= lr ({self.lr!r}), got {self.min_lr!r}")
        check(self.warmup_steps <= self.steps, "warmup_steps",
              f"must be <= steps ({self.steps}), got {self.warmup_steps}")
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
    sequence_parallel: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    fp8: FP8Config = field(default_factory=FP8Config)

    def validate(self) -> None:
        positive(self, "tp", "pp", "dp")
        check(self.vpp is None or self.vpp >= 2, "vpp", f"must be null or >= 2, got {self.vpp!r}")
        check(self.vpp is None or self.pp >= 2, "vpp", f"interleaved pipelining needs pp >= 2, got pp={self.pp}")
        check(not self.sequence_parallel or self.tp > 1, "sequence_parallel", "needs tp > 1")

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
    diagnostics_interval: int = 10
    # coherence/GCG from per-sample gradients (one backward each) of at most this many rollouts per rank (the
    # first ones of the step's batch); null = every rollout
    diagnostics_samples: int | None = None

    def validate(self) -> None:
        positive(self, "log_interval", "diagnostics_interval", "diagnostics_samples")


@dataclass
class LauncherConfig(Section):
    """Slurm resources: training nodes plus per-teacher SGLang server nodes (hetjob or dependent jobs)."""

    nodes: int = 4
    gpus_per_node: int = 8
    partition: str | None = None
    account: str | None = None
    time: str = "08:00:00"
    teacher_nodes: int = 1  # nodes per HTTP teacher
    teacher_gpus: int = 8  # GPUs per teacher node
    sglang_args: list[str] = field(default_factory=list)  # extra `python -m sglang.launch_server` arguments
    sglang_port: int = 30000
    topology: Literal["hetjob", "dependency"] = "hetjob"
    log_dir: str | None = path_field()  # None: <checkpoint.dir>/logs
    env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        positive(self, "nodes", "gpus_per_node", "teacher_gpus")
        non_negative(self, "teacher_nodes")
        check(bool(SLURM_TIME_RE.match(self.time)), "time", f"must be a Slurm time like 08:00:00, got {self.time!r}")
        in_range(self, "sglang_port", 1, 65535, low_open=False, high_open=False)

    @property
    def world_size(self) -> int:
        """Training GPUs."""
        return self.nodes * self.gpus_per_node
