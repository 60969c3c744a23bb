"""Every field of every shipped spec reaches the object that uses it.

The walk collects every leaf field of every spec in yaml/ (teacher names and stream indices as `*`); each must be
in `CONSUMERS`, which names what reads it. Where that reader is a pure function of the spec (the megatron-core
TransformerConfig / DDP / optimizer settings and the memory estimate through `camopd plan`, the rendered Slurm
script and submitit parameters, the algorithm's parameters, the branch schedule, the prompt streams, the sampling
parameters, the HTTP teacher client, offline balancing), the field is changed and the reader's output must change
with it. The fields only the training loop reads name that loop's function (it must exist). A field nothing reads
fails the walk: remove it from the spec schema.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.launch.plan import build_plan
from megatron_camopd.launch.sbatch import render_scripts
from megatron_camopd.launch.submit import slurm_parameters

from .conftest import SPEC_FILES, YAML_DIR

FLAGSHIP = YAML_DIR / "camopd_medical_qwen3_8b.yaml"
UNIOPD = YAML_DIR / "uniopd_math.yaml"


def _plan(spec: Any) -> Any:
    return build_plan(spec, "spec.yaml", [])


def _launch(spec: Any) -> Any:
    from megatron_camopd.launch.servers import launcher_of, server_components

    launcher = launcher_of(spec)
    params = [
        slurm_parameters(launcher, c.nodes, c.gpus_per_node, c.resources, False)
        for c in server_components(spec, cpu=False)
    ]
    return render_scripts(spec, "spec.yaml", [], cpu=False, workdir="/w"), params, _plan(spec)


def _method(spec: Any) -> Any:
    import dataclasses

    from megatron_camopd.algo.methods import spec_method
    from megatron_camopd.loop.train import _loss_spec

    return dataclasses.asdict(spec_method(spec)), _loss_spec(spec)


def _schedule(spec: Any) -> Any:
    from megatron_camopd.loop.session import branch_schedule

    s = branch_schedule(spec)
    return vars(s), s.split(spec.rollout.prompts_per_step)


def _diagnostics(spec: Any) -> Any:
    """The steps the training loop diagnoses (an alternating schedule, so the domain's own interval shows)."""
    from megatron_camopd.loop.session import branch_schedule
    from megatron_camopd.loop.steprow import Diagnostics

    diag = Diagnostics(spec.logging, branch_schedule(spec), spec.train.seed, pad_id=0, micro_batch_size=1)
    return [t for t in range(64) if diag.due(t)]


def _streams(spec: Any) -> Any:
    from megatron_camopd.loop.session import stream_arguments

    return repr(stream_arguments(spec))


def _sampling(spec: Any) -> Any:
    from megatron_camopd.rollout.collect import sampling_params

    return sampling_params(spec.rollout, SimpleNamespace(stop_ids=[7]))


def _http(spec: Any) -> Any:
    """The HttpTeacher the session builds for the first teacher (client and tokenizer check stubbed)."""
    from megatron_camopd.loop import session

    name, cfg = next(iter(spec.teachers.items()))
    with (
        mock.patch("megatron_camopd.teachers.http.HttpTeacher") as client,
        mock.patch("megatron_camopd.teachers.tokcheck.check_tokenizer"),
        mock.patch("megatron_camopd.teachers.tokcheck.TokenizerInfo"),
        mock.patch("megatron_camopd.teachers.tokcheck.default_probe_ids"),
    ):
        session._http_teacher(name, cfg, spec, SimpleNamespace(hf=None, path=None), 512)
    return client.call_args


def _offline(spec: Any) -> Any:
    from megatron_camopd.rollout.offline import balance_plan

    u = spec.method.uniopd
    counts = [c % (u.offline_n + 1) for c in range(40)]
    return repr(balance_plan(counts, u))


PROBES: dict[str, Callable[[Any], Any]] = {
    "plan": _plan,
    "launch": _launch,
    "method": _method,
    "schedule": _schedule,
    "diagnostics": _diagnostics,
    "streams": _streams,
    "sampling": _sampling,
    "http": _http,
    "offline": _offline,
}


def probe(name: str, new: Any = None, base: Path = FLAGSHIP, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"probe": name, "new": new, "base": base, "extra": extra}


def loop(function: str) -> dict[str, Any]:
    """A field read by the training loop / session (module:function)."""
    return {"loop": function}


SERVE = {
    f"teachers.*.serve.{k}": probe("launch", v)
    for k, v in {
        "model": "/data/other_teacher",
        "hf_dir": "/data/hf_out",
        "nodes": None,
        "gpus_per_node": None,
        "tp": 2,
        "dp": 4,
        "mem_fraction_static": 0.5,
        "context_length": 40000,
        "logits_chunk_size": 4096,
        "port": 31000,
        "extra_args": "[--enable-metrics]",
        "env": "{A: b}",
        "resources.exclusive": None,
        "resources.cpus_per_task": None,
        "resources.mem": "500G",
        "resources.container_image": "img:1",
        "resources.container_mounts": None,
    }.items()
}
SERVE["teachers.*.serve.tp"] = probe("launch", 2, extra=("teachers.general.serve.dp=4",))
SERVE["teachers.*.serve.resources.container_mounts"] = probe(
    "launch", "[/a:/a]", extra=("teachers.general.serve.resources.container_image=img:1",)
)
SGLANG_ROLLOUT = ("rollout.engine=sglang", "rollout.sglang.weight_sync=disk")
ROLLOUT_SERVE = {
    f"rollout.sglang.{k}": probe("launch", v, extra=SGLANG_ROLLOUT)
    for k, v in {
        "nodes": None,
        "gpus_per_node": None,
        "dp": 4,
        "mem_fraction_static": 0.5,
        "context_length": 40000,
        "port": 31000,
        "extra_args": "[--x]",
        "env": "{A: b}",
        "servers_per_node": 2,
        "deterministic_inference": False,
        "resources.exclusive": None,
        "resources.cpus_per_task": 8,
        "resources.mem": "500G",
        "resources.container_image": "img:1",
    }.items()
}
ROLLOUT_SERVE["rollout.sglang.tp"] = probe("launch", 2, extra=(*SGLANG_ROLLOUT, "rollout.sglang.dp=4"))
ROLLOUT_SERVE["rollout.sglang.resources.container_mounts"] = probe(
    "launch", "[/a:/a]", extra=(*SGLANG_ROLLOUT, "rollout.sglang.resources.container_image=img:1")
)
VLLM_ROLLOUT = ("rollout.engine=vllm",)
ROLLOUT_VLLM = {
    f"rollout.vllm.{k}": probe("launch", v, extra=VLLM_ROLLOUT)
    for k, v in {
        "nodes": None,
        "gpus_per_node": None,
        "dp": 4,
        "mem_fraction_static": 0.5,
        "context_length": 40000,
        "port": 31000,
        "extra_args": "[--x]",
        "env": "{A: b}",
        "servers_per_node": 2,
        "resources.exclusive": None,
        "resources.cpus_per_task": 8,
        "resources.mem": "500G",
        "resources.container_image": "img:1",
    }.items()
}
ROLLOUT_VLLM["rollout.vllm.tp"] = probe("launch", 2, extra=(*VLLM_ROLLOUT, "rollout.vllm.dp=4"))
ROLLOUT_VLLM["rollout.vllm.resources.container_mounts"] = probe(
    "launch", "[/a:/a]", extra=(*VLLM_ROLLOUT, "rollout.vllm.resources.container_image=img:1")
)
SAMPLER = "megatron_camopd.rollout.sglang:SglangSampler"

CONSUMERS: dict[str, dict[str, Any]] = {
    "name": probe("launch", "other_name"),
    "description": loop("megatron_camopd.config.spec:ExperimentSpec.to_dict"),  # recorded with every run
    "model.hf_path": probe("plan", "/data/models/Qwen3-4B"),
    "model.checkpoint": loop("megatron_camopd.backend.model_source:ModelSource.resolve"),
    "model.tokenizer": loop("megatron_camopd.loop.session:open_session"),
    # tests/data/test_chat_templates
    "model.chat_template_kwargs": loop("megatron_camopd.loop.session:student_tokenizer"),
    "model.dtype": probe("plan", "fp16"),
    "model.seq_length": probe("plan", 40000),
    "teachers.*.checkpoint": loop("megatron_camopd.loop.session:open_session"),
    "teachers.*.hf_path": loop("megatron_camopd.loop.session:open_session"),
    "teachers.*.urls": probe(
        "http",
        '["http://h:1"]',
        extra=(
            "teachers.general.discovery_file=null",
            "teachers.general.serve=null",
            "teachers.general.urls=[http://a:1]",
        ),
    ),
    "teachers.*.discovery_file": probe("http", "/data/x.hosts"),
    "teachers.*.weight": loop("megatron_camopd.loop.train:run_step"),
    "teachers.*.dtype": probe("launch", "fp16"),
    "teachers.*.timeout_s": probe("http"),
    "teachers.*.max_in_flight": probe("http"),
    "teachers.*.retries": probe("http"),
    "teachers.*.discovery_timeout_s": probe("http"),
    "teachers.*.dead_deadline_s": probe("http"),
    "teachers.*.serve": probe("launch", "null"),
    "teachers.*.server": probe("launch", "vllm"),  # the launcher starts vLLM's server for it
    **SERVE,
    "routing": loop("megatron_camopd.rollout.collect:route"),
    **{
        f"data.streams.*.{k}": probe("streams", v)
        for k, v in {"name": "other", "path": "/data/other.jsonl", "format": "prompt", "limit": 10}.items()
    },
    "data.streams.*.domain": loop("megatron_camopd.rollout.collect:route"),
    "data.streams.*.branch": loop("megatron_camopd.loop.session:_build_streams"),
    "data.streams.*.weight": loop("megatron_camopd.rollout.collect:draw_prompts"),
    "data.streams.*.verifier": loop("megatron_camopd.rollout.collect:collect_step"),
    **{
        f"data.{k}": probe("streams", v)
        for k, v in {
            "max_prompt_tokens": None,
            "overlong": "skip",
            "on_bad_row": "skip",
            "seed": None,
            "shuffle": None,
        }.items()
    },
    **{
        f"method.{k}": probe("method", v)
        for k, v in {
            "name": "mopd",
            "loss": "topk",
            "a_max": None,
            "is_weight": "truncate",
            "eps_low": None,
            "eps_high": None,
            "is_cap": None,
            "selection": None,
            "rho_g": 0.5,
            "rho_d": 0.5,
            "r_g": None,
            "r_d": None,
        }.items()
    },
    "method.selection_order": probe("method", "random"),
    "method.name": probe("method", "mopd", extra=("schedule.mode=mixed", "schedule.mix_ratio=[1, 1]")),
    "method.topk": loop("megatron_camopd.rollout.collect:teacher_top_k"),
    **{
        f"method.uniopd.{k}": probe("method", v, base=UNIOPD)
        for k, v in {
            "calibration": "mask",
            "delta_star": None,
            "scope": "global",
            "margin_mode": "minmax",
            "shift": "lift",
            "mask_min_frac": 0.5,
            "online_balance": None,
            "balance_ratio": None,
        }.items()
    },
    "method.uniopd.offline_balance": loop("megatron_camopd.loop.train:train"),  # runs rollout.offline.balance_streams
    **{
        f"method.uniopd.{k}": probe("offline", v, base=UNIOPD)
        for k, v in {
            "offline_n": 6,
            "offline_shape": "u",
            "offline_factor": None,
            "offline_low": 2,
            "offline_high": 5,
        }.items()
    },
    "method.relaxed.lam": probe("method", 0.3, extra=("method.name=relaxed_opd",)),
    "method.relaxed.beta": probe("method", 0.3, extra=("method.name=relaxed_opd",)),
    "method.selectkd.k": probe("method", None, extra=("method.name=selectkd",)),
    "method.selectkd.beta": probe("method", 0.5, extra=("method.name=selectkd",)),
    "method.exopd.lam": probe("method", None, extra=("method.name=exopd",)),
    "method.exopd.reference": loop("megatron_camopd.loop.session:open_session"),
    "schedule.mode": probe("schedule", "mixed", extra=("schedule.mix_ratio=[1, 1]",)),
    "schedule.n_g": probe("schedule", 2),
    "schedule.mix_ratio": probe("schedule", "[3, 1]", extra=("schedule.mode=mixed", "schedule.mix_ratio=[1, 1]")),
    "rollout.engine": probe("plan", "megatron"),  # the flagship rolls out on SGLang servers
    "rollout.kv_cache_gb": probe("plan", 8, extra=("rollout.engine=megatron",)),
    "rollout.sglang.urls": loop(SAMPLER),
    "rollout.sglang.sync_timeout_s": loop("megatron_camopd.rollout.sglang_sync:ServerWeightSync"),
    "rollout.sglang.discovery_file": loop(SAMPLER),
    **ROLLOUT_SERVE,
    **{
        f"rollout.sglang.{k}": loop(SAMPLER)
        for k in (
            "weight_sync",
            "sync_dir",
            "bucket_mb",
            "timeout_s",
            "max_in_flight",
            "retries",
            "discovery_timeout_s",
            "dead_deadline_s",
        )
    },
    **ROLLOUT_VLLM,
    **{
        f"rollout.vllm.{k}": loop("megatron_camopd.rollout.vllm:VllmSampler")
        for k in (
            "urls",
            "discovery_file",
            "weight_sync",
            "sync_dir",
            "sync_timeout_s",
            "timeout_s",
            "max_in_flight",
            "retries",
            "discovery_timeout_s",
            "dead_deadline_s",
        )
    },
    "rollout.max_staleness": loop("megatron_camopd.rollout.pipeline:RolloutPipeline"),  # and collect:_unscorable
    "rollout.on_stale": loop("megatron_camopd.rollout.collect:_unscorable"),
    "rollout.prompts_per_step": probe("schedule", 256, extra=("schedule.mode=mixed", "schedule.mix_ratio=[3, 1]")),
    "rollout.n_samples": loop("megatron_camopd.rollout.collect:collect_step"),
    **{
        f"rollout.{k}": probe("sampling", v)
        for k, v in {
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
            "max_new_tokens": 1024,
            "stop_token_ids": "[3]",
        }.items()
    },
    **{
        f"train.{k}": probe("plan", v)
        for k, v in {
            "steps": 200,
            "micro_batch_size": 2,
            "lr": 1e-6,
            "min_lr": 1e-7,
            "warmup_steps": 10,
            "lr_decay": "cosine",
            "weight_decay": None,
            "adam_beta1": 0.8,
            "adam_beta2": 0.99,
            "adam_eps": None,
            "clip_grad": None,
            "distributed_optimizer": None,
            "overlap_grad_reduce": None,
        }.items()
    },
    "train.seed": probe("http"),
    **{
        f"parallel.{k}": probe("plan", v)
        for k, v in {
            "tp": 4,
            "pp": 1,
            "vpp": None,
            "dp": 8,
            "sequence_parallel": None,
            "recompute": "selective",
            "recompute_modules": None,
            "gradient_accumulation_fusion": False,
        }.items()
    },
    "parallel.vpp": probe("plan", 2, extra=SGLANG_ROLLOUT),
    # with a launcher, dp is checked against its world size
    "parallel.dp": probe("plan", 2, extra=("launcher=null", "rollout.engine=megatron")),
    "parallel.recompute_modules": probe("plan", "[mlp, core_attn]", extra=("parallel.recompute=selective",)),
    **{
        f"parallel.fp8.{k}": probe("plan", v)
        for k, v in {
            "enabled": None,
            "format": "e4m3",
            "recipe": "tensorwise",
            "margin": None,
            "amax_history_len": 16,
            "amax_compute_algo": "most_recent",
        }.items()
    },
    "checkpoint.dir": probe("launch", "/data/other_ckpt", extra=("launcher.log_dir=null",)),
    "checkpoint.save_interval": loop("megatron_camopd.loop.train:train"),
    "checkpoint.keep_last": loop("megatron_camopd.loop.train:train"),
    "checkpoint.resume": loop("megatron_camopd.loop.resume:choose_checkpoint"),
    "checkpoint.optimizer_format": loop("megatron_camopd.loop.state:save"),
    "checkpoint.fully_parallel": loop("megatron_camopd.loop.state:save"),
    **{f"logging.{k}": loop("megatron_camopd.loop.train:train") for k in ("log_interval", "progress", "diagnostics")},
    **{
        f"logging.{k}": probe("diagnostics", v, extra=("schedule.mode=alternate",))
        for k, v in {"diagnostics_interval": 3, "diagnostics_interval_domain": 2, "diagnostics_start": 0}.items()
    },
    **{
        f"logging.{k}": loop("megatron_camopd.loop.steprow:Diagnostics.row")
        for k in ("diagnostics_samples", "diagnostics_null_draws", "diagnostics_sketch_dim")
    },
    "logging.diagnostics_conflict_tokens": loop("megatron_camopd.loop.steprow:Diagnostics"),
    **{
        f"logging.wandb.{k}": loop("megatron_camopd.loop.metrics:MetricsWriter")
        for k in ("enabled", "project", "entity", "mode", "run_name")
    },
    "launcher": probe("launch", "null", extra=("rollout.engine=megatron",)),  # SGLang rollouts need a launcher
    **{
        f"launcher.{k}": probe("launch", v)
        for k, v in {
            "nodes": 2,
            "gpus_per_node": 4,
            "gpu_memory_gb": 141,
            "partition": "gpu",
            "account": "proj",
            "time": "04:00:00",
            "topology": "dependency",
            "log_dir": "/data/logs2",
            "python": "/opt/py",
            "sglang_python": "/opt/sglang/bin/python",
            "vllm_python": "/opt/vllm/bin/python",
            "env": "{A: b}",
            "trainer_env": "{NCCL_IB_HCA: mlx5}",
            "resources.exclusive": None,
            "resources.cpus_per_task": 32,
            "resources.mem": "900G",
            "resources.container_image": "img:2",
            "signal_lead_s": 600,
            "shutdown_timeout_s": 60,
            "health_timeout_s": 600,
            "health_check_timeout_s": 10,
            "teacher_dead_s": 100,
            "watch_interval_s": 5,
        }.items()
    },
    "launcher.resources.container_mounts": probe(
        "launch", "[/a:/a]", extra=("launcher.resources.container_image=img:1",)
    ),
    "launcher.teacher_dead_s": probe("launch", 100, extra=("launcher.topology=dependency",)),
    "launcher.watch_interval_s": probe("launch", 5, extra=("launcher.topology=dependency",)),
}


def leaf_patterns(data: Any, path: tuple[str, ...] = ()) -> set[str]:
    """Dotted leaf fields of a spec's `to_dict()` (teacher names and stream indices as `*`)."""
    if isinstance(data, dict) and not (path and path[-1] in ("env", "trainer_env", "routing")) and data:
        return set().union(*(leaf_patterns(v, path + (str(k),)) for k, v in data.items()))
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return set().union(*(leaf_patterns(v, path + ("*",)) for v in data))
    parts = list(path)
    if parts[0] == "teachers" and len(parts) > 1:
        parts[1] = "*"
    return {".".join(parts)}


def test_every_field_of_every_shipped_spec_has_a_consumer() -> None:
    fields: set[str] = set()
    for path in SPEC_FILES:
        fields |= leaf_patterns(load_spec(path).to_dict())
    unknown = sorted(f for f in fields if f not in CONSUMERS)
    assert not unknown, f"fields nothing is known to read (wire them or remove them): {unknown}"


def _concrete(pattern: str, spec: Any) -> str:
    return pattern.replace("teachers.*", f"teachers.{next(iter(spec.teachers))}").replace("streams.*", "streams.0")


def _changed(value: Any) -> str:
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, (int, float)):
        return repr(value * 2 if value else 1)
    raise AssertionError(f"give CONSUMERS a new value for {value!r}")


@pytest.mark.parametrize("pattern", sorted(p for p, c in CONSUMERS.items() if "probe" in c))
def test_changing_the_field_changes_its_consumer(pattern: str) -> None:
    entry = CONSUMERS[pattern]
    base = load_spec(entry["base"], list(entry["extra"]))
    field = _concrete(pattern, base)
    value = entry["new"]
    if value is None:
        current: Any = base
        for part in field.split("."):
            current = (
                current[part]
                if isinstance(current, dict)
                else current[int(part)]
                if isinstance(current, list)
                else getattr(current, part)
            )
        value = _changed(current)
    changed = load_spec(entry["base"], [*entry["extra"], f"{field}={value}"])
    fn = PROBES[entry["probe"]]
    assert fn(changed) != fn(base), f"{field}={value} does not reach {entry['probe']}"


@pytest.mark.parametrize("pattern", sorted(p for p, c in CONSUMERS.items() if "loop" in c))
def test_loop_consumers_exist(pattern: str) -> None:
    module, _, attr = CONSUMERS[pattern]["loop"].partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    assert callable(obj)
