"""What the launchers start for a spec, as plain data: the servers the trainer waits for, and the trainer.

`server_components(spec, cpu=...)` lists one component per teacher with a `serve` section (its SGLang servers,
one per node, loading `serve.model`, else the teacher's hf_path/checkpoint) and, when `rollout.engine: sglang`
names no urls, the student's rollout servers (loading the student's model, flags from `rollout.sglang`). Each
carries its Slurm request (nodes, GPUs, `resources`), its environment, its command line with placeholders (the
model directory, port and ready file are only known on the node) and the overrides that point the trainer at its
discovery file. `camopd sbatch` renders them into the templates, `camopd launch` submits them with submitit and
`camopd plan` prints them: one source of truth.

SGLang cannot load a camopd checkpoint: `ensure_hf(model, out)` (also `python -m megatron_camopd.launch.servers
ensure-hf MODEL OUT`) returns `model` when it is an HF directory and otherwise converts the checkpoint to `out`
once (a temporary directory renamed into place; redone only when the checkpoint's newest iteration changed).
The CPU backend (`--cpu`, `camopd serve-teacher`) loads checkpoints directly.
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
from megatron_camopd.config.serving import SlurmResources
from megatron_camopd.config.spec import ExperimentSpec

# placeholders in a server's argv / the trainer's overrides, filled on the node (bash: "$1".., python: str.replace)
PYTHON, MODEL, PORT, READY, ADDR = "@PYTHON@", "@MODEL@", "@PORT@", "@READY@", "@ADDR@"
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
)
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
    port: int | None = None  # servers: the port of each server (CPU backend: any free port, see READY)
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
        return f"{self.kind} {self.name}: {self.model}, {gpus}, port {self.port}"


def launcher_of(spec: ExperimentSpec) -> LauncherConfig:
    """The spec's launcher section (its defaults for a spec without one)."""
    return spec.launcher or LauncherConfig()


def served_hf_dir(spec: ExperimentSpec, name: str, given: str | None) -> str:
    """Where the launcher converts a served checkpoint: `given`, else <checkpoint.dir>/served_hf/<name>."""
    return given or os.path.join(spec.checkpoint.dir, "served_hf", name)


def _sglang_argv(tp: int, dp: int, mem: float, context: int, dtype: str, extra: list[str]) -> tuple[str, ...]:
    return (
        PYTHON,
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
        *extra,
    )


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


def server_components(spec: ExperimentSpec, *, cpu: bool) -> list[Component]:
    """The server groups the launcher starts before the trainer, in spec order (teachers, then rollout)."""
    out: list[Component] = []
    for name, teacher in spec.teachers.items():
        serve = teacher.serve
        if serve is None or not spec.method.method_class().needs_teachers:
            continue
        env = dict(serve.env)
        if serve.logits_chunk_size is not None:
            env = {
                "SGLANG_ENABLE_LOGITS_PROCESSER_CHUNK": "1",
                "SGLANG_LOGITS_PROCESSER_CHUNK_SIZE": str(serve.logits_chunk_size),
                **env,
            }
        argv = (
            _cpu_argv("teacher")
            if cpu
            else _sglang_argv(
                serve.tp,
                serve.dp,
                serve.mem_fraction_static,
                serve.context_length or spec.seq_length,
                teacher.dtype or spec.model.dtype,
                serve.extra_args,
            )
        )
        overrides = tuple(f"teachers.{name}.{key}=null" for key in ("hf_path", "checkpoint", "dtype", "serve")) + (
            f"teachers.{name}.discovery_file={ADDR}",
        )
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
                argv=argv,
                env=env,
                overrides=overrides,
            )
        )
    r = spec.rollout.sglang
    if spec.rollout.engine == "sglang" and r.urls is None:
        argv = (
            _cpu_argv("rollout")
            if cpu
            else _sglang_argv(
                r.tp, r.dp, r.mem_fraction_static, r.context_length or spec.seq_length, spec.model.dtype, r.extra_args
            )
        )
        out.append(
            Component(
                "rollout",
                "rollout",
                r.nodes,
                r.gpus_per_node,
                r.resources,
                model=spec.model.hf_path or spec.model.checkpoint,
                hf_dir=served_hf_dir(spec, "student", None),
                port=r.port,
                argv=argv,
                env=dict(r.env),
                overrides=(f"rollout.sglang.discovery_file={ADDR}",),
            )
        )
    return out


def trainer_component(spec: ExperimentSpec) -> Component:
    launcher = launcher_of(spec)
    return Component("trainer", "trainer", launcher.nodes, launcher.gpus_per_node, launcher.resources)


def fill(args: tuple[str, ...] | list[str], **values: str) -> list[str]:
    """`args` with the placeholders replaced (keys: python, model, port, ready, addr)."""
    marks = {"python": PYTHON, "model": MODEL, "port": PORT, "ready": READY, "addr": ADDR}
    out = []
    for arg in args:
        for key, value in values.items():
            arg = arg.replace(marks[key], value)
        out.append(arg)
    return out


def ensure_hf(model: str, out: str) -> str:
    """The HF directory SGLang loads for `model`: `model` itself when it holds config.json; else `out`, converted
    from the camopd checkpoint `model` unless `out` already holds a conversion of its newest iteration."""
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
