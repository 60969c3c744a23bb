"""`camopd plan`: the megatron-core settings a spec becomes, its per-GPU memory estimate and its Slurm components."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.launch.memory import estimate
from megatron_camopd.launch.plan import EXIT_OVER_MEMORY, PRESETS, build_plan, plan_main, student_arch

REPO = Path(__file__).resolve().parents[2]
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
        "overhead",
    }
    assert mem["fits"] and 0 < mem["total"] <= spec.launcher.gpu_memory_gb
    kinds = [c["kind"] for c in plan["slurm"]["components"]]
    assert kinds == ["teacher"] * len(spec.teachers) + ["trainer"]
    for c in plan["slurm"]["components"][:-1]:
        assert c["command"].startswith("python -m sglang.launch_server --model-path /data/camopd/models/")


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
    inproc = load_spec(
        FLAGSHIP,
        ["teachers.general.discovery_file=null", "teachers.general.serve=null", "teachers.general.hf_path=/data/x"],
    )
    assert estimate(inproc, arch)["terms"]["inprocess_teachers"] == pytest.approx(full["terms"]["weights"])
    sglang = estimate(load_spec(FLAGSHIP, ["rollout.engine=sglang", "rollout.sglang.weight_sync=disk"]), arch)
    assert sglang["terms"]["rollout_kv_cache"] == 0


def test_arch_from_config_json_or_preset(tmp_path: Path) -> None:
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**PRESETS["qwen3-4b"], "num_hidden_layers": 4}))
    spec = load_spec(FLAGSHIP, [f"model.hf_path={model}", "parallel.pp=1", "parallel.tp=2"])
    arch, source = student_arch(spec)
    assert arch.num_layers == 4 and source.endswith("config.json")
    assert student_arch(spec, "qwen3-8b")[0].num_layers == 36


def test_inprocess_teacher_counts_its_own_architecture(tmp_path: Path) -> None:
    from megatron_camopd.launch.memory import DTYPE_BYTES, GB, stage_params
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
