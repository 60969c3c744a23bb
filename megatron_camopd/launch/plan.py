"""`camopd plan SPEC [key=value ...] [--json] [--arch NAME]`: what a spec becomes on a cluster, without running it.

Prints the student's megatron-core TransformerConfig as a CUDA + TransformerEngine run builds it (megatron-core's
field names: `sequence_parallel`, `recompute_granularity`, `recompute_method`, `recompute_modules`, `fp8`,
`fp8_recipe`, ...; `backend/settings.py`, the same functions the trainer calls), the DDP / optimizer / LR-schedule
settings, the parallel layout, a per-GPU memory estimate (`launch/memory.py`), an estimated rollout time per step
for the in-process engine and for SGLang servers (`launch/rollout_time.py`, its formula in the docstring) and the
Slurm components the launchers would start (`launch/servers.py`). JSON keys: `transformer_config`, `ddp_config`,
`optimizer_config`, `scheduler`, `parallel`, `memory_gb_per_gpu`, `rollout_time_s`, `slurm`, `arch`.

The architecture comes from the student's config.json (`model.hf_path`, or a checkpoint's saved config). On a
login node where the model is not readable, `--arch` names a published architecture (`qwen3-4b`, `qwen3-8b`, ...);
without it the size in the model's path name (`.../II-Medical-8B` -> qwen3-8b) picks one, and the output says so.

Exit status: 0 when the estimate fits `launcher.gpu_memory_gb`, 3 when it does not (the message names the largest
term), 2 for a spec error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from megatron_camopd.backend.model import ModelArch
from megatron_camopd.backend.settings import (
    cluster_transformer_config,
    ddp_config_fields,
    optimizer_config_fields,
    scheduler_fields,
)
from megatron_camopd.config import load_spec
from megatron_camopd.errors import CamopdError, SpecError
from megatron_camopd.launch.memory import estimate
from megatron_camopd.launch.rollout_time import estimate_rollout_time
from megatron_camopd.launch.servers import (
    BASE_GPU,
    MODEL,
    PORT,
    PYTHON,
    READY,
    SGLANG_PY,
    VLLM_PY,
    fill,
    launcher_of,
    server_components,
    trainer_component,
)

EXIT_OVER_MEMORY = 3

_QWEN3 = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "hidden_act": "silu",
}
# the published Qwen3 dense configs (config.json of Qwen/Qwen3-*), for machines that cannot read the model
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        **_QWEN3,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "tie_word_embeddings": True,
    },
    "qwen3-1.7b": {
        **_QWEN3,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "tie_word_embeddings": True,
    },
    "qwen3-4b": {
        **_QWEN3,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "tie_word_embeddings": True,
    },
    "qwen3-8b": {
        **_QWEN3,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "tie_word_embeddings": False,
    },
    "qwen3-14b": {
        **_QWEN3,
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "tie_word_embeddings": False,
    },
    "qwen3-32b": {
        **_QWEN3,
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_hidden_layers": 64,
        "num_attention_heads": 64,
        "tie_word_embeddings": False,
    },
}
SIZE_RE = re.compile(r"(?<![0-9.])(0\.6|1\.7|4|8|14|32)b(?![a-z0-9])", re.IGNORECASE)


def student_arch(spec: Any, preset: str | None = None) -> tuple[ModelArch, str]:
    """(the student's architecture, where it came from)."""
    if preset is not None:
        if preset not in PRESETS:
            raise SpecError(f"--arch {preset!r}: known architectures: {', '.join(PRESETS)}")
        return ModelArch.from_hf_config(PRESETS[preset], source=f"preset {preset}"), f"preset {preset} (--arch)"
    m = spec.model
    candidates = [Path(m.hf_path)] if m.hf_path else []
    if m.checkpoint:
        from megatron_camopd.backend.checkpoint import find_model_meta

        try:
            candidates.insert(0, Path(find_model_meta(m.checkpoint)))
        except CamopdError:
            pass
    for path in candidates:
        if (path / "config.json").is_file():
            return ModelArch.from_hf_dir(path), str(path / "config.json")
    name = str(m.hf_path or m.checkpoint)
    found = SIZE_RE.findall(Path(name).name) or SIZE_RE.findall(name)
    if not found:
        raise SpecError(f"model: cannot read {name}/config.json from here; pass --arch ({', '.join(PRESETS)})")
    guess = f"qwen3-{found[-1].lower()}b"
    return (
        ModelArch.from_hf_config(PRESETS[guess], source=f"preset {guess}"),
        f"preset {guess} (guessed from the path {name}, whose config.json is not readable here; --arch sets it)",
    )


def frozen_archs(spec: Any, student: ModelArch) -> list[ModelArch]:
    """Architectures of the in-process teachers and ExOPD's reference (the student's where unreadable here)."""
    method = spec.method.method_class()
    if not method.needs_teachers:
        return []
    models = [(c.hf_path, c.checkpoint) for c in spec.teachers.values() if c.kind == "megatron"]
    if method.needs_reference:
        models.append((method.reference_path(spec.method), None))
    out = []
    for hf_path, checkpoint in models:
        path = Path(hf_path) if hf_path else None
        if checkpoint:
            from megatron_camopd.backend.checkpoint import find_model_meta

            try:
                path = Path(find_model_meta(checkpoint))
            except CamopdError:
                path = None
        out.append(ModelArch.from_hf_dir(path) if path is not None and (path / "config.json").is_file() else student)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return getattr(value, "__name__", None) or str(value)


def transformer_config_dict(spec: Any, arch: ModelArch) -> dict[str, Any]:
    """The TransformerConfig's fields (JSON-safe): callables by name, dtypes and enums as strings."""
    with warnings.catch_warnings():  # megatron-core's deprecation notes about fields we leave at their defaults
        warnings.simplefilter("ignore")
        config = cluster_transformer_config(spec, arch)
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "fp8_recipe" and not config.fp8:
            value = None  # megatron-core's default recipe is meaningless without fp8
        out[f.name] = _plain(value)
    return out


def slurm_plan(spec: Any, spec_path: str, overrides: list[str]) -> list[dict[str, Any]]:
    """The components the launchers start, in order (servers, then the trainer), with their commands."""
    launcher = launcher_of(spec)
    out = []
    servers = server_components(spec, cpu=False)
    for c in servers:
        cmd = fill(
            c.argv,
            python="python",
            sglang_python=launcher.sglang_python or "python",
            vllm_python=launcher.vllm_python or "python",
            model=str(c.model),
            port=str(c.port),
            ready="READY",
            base_gpu="0",
        )
        out.append(
            {
                "kind": c.kind,
                "name": c.name,
                "nodes": c.nodes,
                "gpus_per_node": c.gpus_per_node,
                "resources": dataclasses.asdict(c.resources),
                "model": c.model,
                "port": c.port,
                "servers_per_node": c.per_node,
                "env": c.env,
                "command": " ".join(cmd),
            }
        )
    trainer = trainer_component(spec)
    extra = [o.replace("@ADDR@", f"<discovery dir>/{c.name}.addr") for c in servers for o in c.overrides]
    cmd = [
        "torchrun",
        f"--nnodes={trainer.nodes}",
        f"--nproc-per-node={trainer.gpus_per_node}",
        "-m",
        "megatron_camopd.cli",
        "train",
        spec_path,
        *overrides,
        *extra,
    ]
    out.append(
        {
            "kind": "trainer",
            "name": "trainer",
            "nodes": trainer.nodes,
            "gpus_per_node": trainer.gpus_per_node,
            "resources": dataclasses.asdict(trainer.resources),
            "env": dict(launcher.trainer_env),
            "command": " ".join(cmd),
        }
    )
    assert not any(mark in str(out) for mark in (MODEL, PORT, PYTHON, SGLANG_PY, VLLM_PY, READY, BASE_GPU))
    return out


def build_plan(spec: Any, spec_path: str, overrides: list[str], preset: str | None = None) -> dict[str, Any]:
    """Everything `camopd plan` prints, as JSON-ready data."""
    arch, source = student_arch(spec, preset)
    p = spec.parallel
    launcher = launcher_of(spec)
    world = launcher.world_size if spec.launcher is not None else p.tp * p.pp * (p.dp or 1)
    memory = estimate(spec, arch, frozen_archs(spec, arch))
    memory["gpu_memory_gb"] = launcher.gpu_memory_gb
    memory["fits"] = memory["total"] <= launcher.gpu_memory_gb
    return {
        "spec": spec.name,
        "arch": {"source": source, **dataclasses.asdict(arch)},
        "parallel": {
            "world_size": world,
            "tp": p.tp,
            "pp": p.pp,
            "vpp": p.vpp,
            "dp": world // (p.tp * p.pp),
            "layers_per_stage": arch.num_layers // (p.pp * (p.vpp or 1)),
            "micro_batch_tokens": spec.train.micro_batch_size * spec.seq_length,
        },
        "transformer_config": transformer_config_dict(spec, arch),
        "ddp_config": ddp_config_fields(spec),
        "optimizer_config": optimizer_config_fields(spec),
        "scheduler": scheduler_fields(spec),
        "memory_gb_per_gpu": memory,
        "rollout_time_s": estimate_rollout_time(spec, arch, world // (p.tp * p.pp), launcher.gpu_memory_gb),
        "slurm": {
            "topology": launcher.topology,
            "time": launcher.time,
            "partition": launcher.partition,
            "components": slurm_plan(spec, spec_path, overrides),
        },
    }


KEY_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "sequence_parallel",
    "gradient_accumulation_fusion",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "recompute_modules",
    "fp8",
    "fp8_recipe",
    "fp8_margin",
    "fp8_amax_history_len",
    "params_dtype",
    "bf16",
    "calculate_per_token_loss",
)


def render_text(plan: dict[str, Any]) -> str:
    """The human-readable plan (the JSON has every TransformerConfig field)."""
    lines = [f"spec {plan['spec']}: architecture from {plan['arch']['source']}"]
    lines.append("parallel: " + ", ".join(f"{k}={v}" for k, v in plan["parallel"].items()))
    tc = plan["transformer_config"]
    lines.append("transformer_config: " + ", ".join(f"{k}={tc[k]!r}" for k in KEY_FIELDS if k in tc))
    for key in ("ddp_config", "optimizer_config", "scheduler"):
        lines.append(f"{key}: " + ", ".join(f"{k}={v!r}" for k, v in plan[key].items()))
    mem = plan["memory_gb_per_gpu"]
    terms = ", ".join(f"{k} {v:g}" for k, v in mem["terms"].items())
    lines.append(
        f"memory per GPU (stage {mem['stage']}), GB: {terms}"
        + f"; total {mem['total']:g} of {mem['gpu_memory_gb']:g} (activations without recompute "
        f"{mem['activations_no_recompute']:g}, with full recompute {mem['activations_recompute_full']:g})"
    )
    lines.append(f"checkpoint save, host memory per rank: optimizer state {mem['checkpoint_host_gb']:g} GB")
    lines.append(_rollout_line(plan["rollout_time_s"], plan["memory_gb_per_gpu"]["gpu_memory_gb"]))
    lines.append(f"slurm ({plan['slurm']['topology']}, time {plan['slurm']['time']}):")
    for c in plan["slurm"]["components"]:
        res = c["resources"]
        lines.append(
            f"  {c['kind']} {c['name']}: {c['nodes']} node(s) x {c['gpus_per_node']} GPU(s), exclusive="
            f"{res['exclusive']}, cpus_per_task={res['cpus_per_task']}, mem={res['mem']}"
            + (f", image {res['container_image']}" if res["container_image"] else "")
        )
        lines.append(f"    {c['command']}")
    return "\n".join(lines) + "\n"


def _rollout_line(est: dict[str, Any], gpu_memory_gb: float) -> str:
    m, s = est["megatron"], est["sglang"]
    kv = f"KV {m['kv_gb_min_group']:g} GB for its smallest group" + (
        "" if m["kv_budget_holds_a_group"] else ", over rollout.kv_cache_gb: refused at start"
    )
    return (
        f"rollout time per step (estimate, upper bound: {est['samples_per_step']} samples x {est['max_new_tokens']} "
        f"new tokens; engine in force: {est['engine']}): megatron in process ({m['layout']}) ~{m['seconds']:g} s "
        f"= {m['groups_per_rank']} sequential group(s) of {m['rows_per_group']} rows per rank, {kv}; {est['served']} "
        f"({s['engines']} engine(s), {s['gpus']} GPUs of {gpu_memory_gb:g} GB, {s['sequences_per_engine']} sequences "
        f"each) ~{s['seconds']:g} s"
    )


def plan_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="camopd plan", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--arch", choices=sorted(PRESETS), help="the student's architecture when config.json is unreadable")
    args = ap.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = load_spec(args.spec, args.overrides)
        plan = build_plan(spec, args.spec, list(args.overrides), args.arch)
    except CamopdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(plan, indent=1) + "\n" if args.json else render_text(plan))
    mem = plan["memory_gb_per_gpu"]
    if not mem["fits"]:
        print(
            f"error: the estimate of {mem['total']:g} GB per GPU exceeds launcher.gpu_memory_gb = "
            f"{mem['gpu_memory_gb']:g}; the largest term is {mem['largest']} ({mem['terms'][mem['largest']]:g} GB)",
            file=sys.stderr,
        )
        return EXIT_OVER_MEMORY
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())
