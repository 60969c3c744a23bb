"""`camopd plan`: the megatron-core settings a spec becomes, its per-GPU memory estimate and its Slurm components."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.launch.memory import estimate, stage_params
from megatron_camopd.launch.plan import EXIT_OVER_MEMORY, PRESETS, build_plan, plan_main, student_arch
from tests.helpers import REPO

CLUSTER_SPECS = sorted(p for p in (REPO / "yaml").rglob("*.yaml") if "examples" not in p.parts)
FLAGSHIP = REPO / "yaml" / "camopd_medical_qwen3_8b.yaml"
RECOMPUTE = {"none": None, "full": "full", "selective": "selective"}


@pytest.mark.parametrize("path", CLUSTER_SPECS, ids=lambda p: p.name)
def test_plan_json_shows_the_spec_settings(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main([str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"transformer_config", "memory_gb_per_gpu", "slurm"} <= set(plan)
    spec = load_spec(path)
    p, tc = spec.parallel, plan["transformer_config"]
    assert tc["sequence_parallel"] is p.sequence_parallel
    assert tc["recompute_granularity"] == RECOMPUTE[p.recompute]
    assert tc["fp8"] == (p.fp8.format if p.fp8.enabled else None)
    assert tc["fp8_recipe"] == (p.fp8.recipe if p.fp8.enabled else None)
    assert (tc["tensor_model_parallel_size"], tc["pipeline_model_parallel_size"]) == (p.tp, p.pp)
    if p.recompute == "full":
        assert (tc["recompute_method"], tc["recompute_num_layers"]) == ("uniform", 1)
    assert tc["calculate_per_token_loss"] is True and tc["apply_rope_fusion"] is True
    assert plan["ddp_config"]["use_distributed_optimizer"] is spec.train.distributed_optimizer
    assert plan["optimizer_config"]["lr"] == spec.train.lr
    mem = plan["memory_gb_per_gpu"]
    assert set(mem["terms"]) == {
        "weights",
        "grads",
        "optimizer",
        "activations",
        "inprocess_teachers",
        "rollout_kv_cache",
        "rollout_snapshot",
        "rollout_weight_clones",
        "overhead",
    }
    assert mem["fits"] and 0 < mem["total"] <= spec.launcher.gpu_memory_gb
    assert spec.rollout.engine == "sglang"  # the cluster specs roll out on SGLang servers, as the papers do
    kinds = [c["kind"] for c in plan["slurm"]["components"]]
    assert kinds == ["teacher"] * len(spec.teachers) + ["rollout", "trainer"]
    for c in plan["slurm"]["components"][:-1]:
        assert c["command"].startswith("python -m sglang.launch_server --model-path /data/camopd/models/")
    est = plan["rollout_time_s"]
    assert est["engine"] == "sglang" and est["megatron"]["seconds"] > 0 and est["sglang"]["seconds"] > 0


def test_selective_recompute_and_fp8_recipe_reach_the_config() -> None:
    spec = load_spec(
        FLAGSHIP,
        [
            "parallel.recompute=selective",
            "parallel.recompute_modules=[mlp, layernorm]",
            "parallel.fp8.recipe=tensorwise",
        ],
    )
    tc = build_plan(spec, str(FLAGSHIP), [])["transformer_config"]
    assert (tc["recompute_granularity"], tc["recompute_modules"]) == ("selective", ["mlp", "layernorm"])
    assert (tc["fp8"], tc["fp8_recipe"]) == ("hybrid", "tensorwise")
    off = build_plan(
        load_spec(
            FLAGSHIP, ["parallel.sequence_parallel=false", "parallel.recompute=none", "parallel.fp8.enabled=false"]
        ),
        str(FLAGSHIP),
        [],
    )["transformer_config"]
    assert (off["sequence_parallel"], off["recompute_granularity"], off["fp8"]) == (False, None, None)


def test_over_memory_exits_naming_the_largest_term(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main([str(FLAGSHIP), "parallel.recompute=none"]) == EXIT_OVER_MEMORY
    err = capsys.readouterr().err
    assert "exceeds launcher.gpu_memory_gb = 80" in err and "the largest term is activations" in err


def test_memory_terms_follow_the_spec() -> None:
    """Qwen3-8B at TP2/PP2 and a 36,864-token micro-batch: ~100 GB of activations without recompute, a few with
    ; the distributed optimizer shards Adam's state over DP; in-process teachers add their weights."""
    spec = load_spec(FLAGSHIP)
    arch, source = student_arch(spec)
    assert "qwen3-8b" in source and arch.hidden_size == 4096
    full = estimate(spec, arch)
    assert 80 < full["activations_no_recompute"] < 160 and full["activations_recompute_full"] < 25
    plain = estimate(load_spec(FLAGSHIP, ["train.distributed_optimizer=false"]), arch)
    assert plain["terms"]["optimizer"] == pytest.approx(8 * full["terms"]["optimizer"], rel=0.01)  # dp = 8
    # checkpoint saves: the flagship's dp_reshardable stages its own optimizer shard, fully_reshardable the
    # replica's whole state gathered over DP (~24 GB a rank for Qwen3-8B at TP2/PP2)
    gather = estimate(load_spec(FLAGSHIP, ["checkpoint.optimizer_format=fully_reshardable"]), arch)
    assert spec.checkpoint.optimizer_format == "dp_reshardable"
    assert gather["checkpoint_host_gb"] == pytest.approx(8 * full["checkpoint_host_gb"], rel=0.01)
    assert 20 < gather["checkpoint_host_gb"] < 30 and gather["checkpoint_host_gb"] == plain["checkpoint_host_gb"]
    inproc = load_spec(
        FLAGSHIP,
        ["teachers.general.discovery_file=null", "teachers.general.serve=null", "teachers.general.hf_path=/data/x"],
    )
    assert estimate(inproc, arch)["terms"]["inprocess_teachers"] == pytest.approx(full["terms"]["weights"])
    assert full["terms"]["rollout_kv_cache"] == 0  # the flagship rolls out on SGLang servers
    inproc_rollouts = estimate(load_spec(FLAGSHIP, ["rollout.engine=megatron"]), arch)
    assert inproc_rollouts["terms"]["rollout_kv_cache"] == pytest.approx(16.0)
    # rollouts and training passes take turns: the peak holds the larger of KV cache and activations, not both
    t = inproc_rollouts["terms"]
    assert inproc_rollouts["total"] == pytest.approx(sum(t.values()) - min(t["activations"], 16.0), abs=0.05)


def test_arch_from_config_json_or_preset(tmp_path: Path) -> None:
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**PRESETS["qwen3-4b"], "num_hidden_layers": 4}))
    spec = load_spec(FLAGSHIP, [f"model.hf_path={model}", "parallel.pp=1", "parallel.tp=2"])
    arch, source = student_arch(spec)
    assert arch.num_layers == 4 and source.endswith("config.json")
    assert student_arch(spec, "qwen3-8b")[0].num_layers == 36


def test_inprocess_teacher_counts_its_own_architecture(tmp_path: Path) -> None:
    from megatron_camopd.launch.memory import DTYPE_BYTES, GB
    from megatron_camopd.launch.plan import frozen_archs

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(PRESETS["qwen3-4b"]))
    spec = load_spec(
        FLAGSHIP,
        ["teachers.general.discovery_file=null", "teachers.general.serve=null", f"teachers.general.hf_path={teacher}"],
    )
    student = student_arch(spec)[0]
    archs = frozen_archs(spec, student)
    assert [a.hidden_size for a in archs] == [2560]
    mem = build_plan(spec, str(FLAGSHIP), [])["memory_gb_per_gpu"]
    expected = stage_params(archs[0], 2, 2, mem["stage"]) * DTYPE_BYTES["bf16"] / GB
    assert mem["terms"]["inprocess_teachers"] == pytest.approx(expected, abs=0.01)


ASYNC_INPROC = [
    "rollout.engine=megatron",
    "rollout.max_staleness=1",
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.sequence_parallel=false",
    "parallel.fp8.enabled=false",
]


def test_async_in_process_counts_the_snapshot_and_weight_clones(capsys: pytest.CaptureFixture[str]) -> None:
    """One-step-off rollouts in process hold a second student (the snapshot the rollout thread samples with) and a
    parameter copy per batch in flight, and their KV cache adds to the activations (they overlap training): for
    Qwen3-8B at TP = PP = 1 that is more than an 80 GB GPU, and `camopd plan` says so."""
    arch = student_arch(load_spec(FLAGSHIP))[0]
    on_policy = estimate(load_spec(FLAGSHIP, [*ASYNC_INPROC, "rollout.max_staleness=0"]), arch)
    one_off = estimate(load_spec(FLAGSHIP, ASYNC_INPROC), arch)
    two_off = estimate(load_spec(FLAGSHIP, [*ASYNC_INPROC, "rollout.max_staleness=2"]), arch)
    w = on_policy["terms"]["weights"]
    assert w > 15  # ~16 GB of bf16 weights
    assert on_policy["terms"]["rollout_snapshot"] == on_policy["terms"]["rollout_weight_clones"] == 0
    assert one_off["terms"]["rollout_snapshot"] == pytest.approx(w, abs=0.01)
    assert one_off["terms"]["rollout_weight_clones"] == pytest.approx(w, abs=0.01)
    assert two_off["terms"]["rollout_weight_clones"] == pytest.approx(2 * w, abs=0.02)
    # overlapped: the KV cache no longer shares the activations' peak
    t = one_off["terms"]
    assert one_off["total"] == pytest.approx(sum(t.values()), abs=0.05)
    assert one_off["total"] > on_policy["total"] + 2 * w
    assert plan_main([str(FLAGSHIP), *ASYNC_INPROC]) == EXIT_OVER_MEMORY
    assert "exceeds launcher.gpu_memory_gb = 80" in capsys.readouterr().err


def test_rollout_time_estimate_follows_its_formula(capsys: pytest.CaptureFixture[str]) -> None:
    """The docstring's formulas of launch/rollout_time.py, recomputed here for the flagship at a small scale, and
    printed by `camopd plan` for both engines."""
    import math

    from megatron_camopd.launch import rollout_time as rt

    over = ["rollout.prompts_per_step=64", "rollout.max_new_tokens=1024", "rollout.kv_cache_gb=4"]
    spec = load_spec(FLAGSHIP, over)
    arch = student_arch(spec)[0]
    est = rt.estimate_rollout_time(spec, arch, dp=8, gpu_memory_gb=80)
    b = rt.HBM_BYTES_S * rt.HBM_EFFICIENCY
    p_len, n_new = 4096, 1024
    ctx = p_len + n_new / 2
    # megatron at TP2/PP2/DP8 with FP8 rows of 16: 8 samples a rank, one padded group of 16 rows
    k_stage = rt.kv_bytes_per_token(arch, arch.num_layers / 2, 2, 2)
    w_stage = max(stage_params(arch, 2, 2, s) for s in (0, 1)) * 2
    m = est["megatron"]
    assert (m["samples_per_rank"], m["rows_per_group"], m["groups_per_rank"]) == (8, 16, 1)
    step = 2 * ((w_stage + 16 * ctx * k_stage) / b + arch.num_layers / 2 * rt.EAGER_S_PER_LAYER) + rt.HOST_SYNC_S
    assert m["seconds"] == pytest.approx(n_new * step, abs=0.1)
    assert m["kv_gb_min_group"] == pytest.approx(16 * (p_len + n_new) * k_stage / 1e9, abs=0.01)
    # sglang: 2 nodes x 8 single-GPU servers; 4 sequences each, one wave
    s = est["sglang"]
    w_model, k_model = stage_params(arch, 1, 1, 0) * 2, rt.kv_bytes_per_token(arch, arch.num_layers, 1, 2)
    assert (s["engines"], s["gpus"], s["sequences_per_engine"], s["waves"]) == (16, 16, 4, 1)
    assert s["seconds"] == pytest.approx(n_new * ((w_model + 4 * ctx * k_model) / b + rt.SGLANG_STEP_S), abs=0.1)
    # one server of tp 8 a node: 2 engines of 32 sequences, each step adds the layers' TP all-reduces
    s8 = rt.sglang_estimate(load_spec(FLAGSHIP, [*over, "rollout.sglang.tp=8"]), arch, 64, 80)
    assert (s8["engines"], s8["gpus"], s8["sequences_per_engine"], s8["waves"]) == (2, 16, 32, 1)
    step = (w_model / 8 + 32 * ctx * k_model / 8) / b + rt.SGLANG_STEP_S + 2 * arch.num_layers * rt.ALLREDUCE_S
    assert s8["seconds"] == pytest.approx(n_new * step, abs=0.1)
    # a KV budget that holds one padded group of 16 rows at most: 64 samples over dp 2 = 32 a rank, 2 groups
    small = rt.megatron_estimate(load_spec(FLAGSHIP, [*over, "rollout.kv_cache_gb=2"]), arch, 64, 2)
    assert small["kv_budget_holds_a_group"] is False and small["groups_per_rank"] == 2
    # more samples than the servers hold at once: waves, each bounded by the KV cache an engine holds
    many = rt.sglang_estimate(load_spec(FLAGSHIP, [*over, "rollout.prompts_per_step=4096"]), arch, 4096, 80)
    kv_tokens = (spec.rollout.sglang.mem_fraction_static * 80e9 - w_model) / k_model
    assert many["sequences_per_engine"] == int(kv_tokens // (p_len + n_new)) < 4096 // 16
    assert many["waves"] == math.ceil(4096 / (16 * many["sequences_per_engine"]))
    assert plan_main([str(FLAGSHIP), *over]) == 0
    out = capsys.readouterr().out
    assert (
        "rollout time per step (estimate" in out
        and "megatron in process" in out
        and "sglang (16 engine(s), 16 GPUs" in out
    )
