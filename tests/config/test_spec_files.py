"""Every shipped spec in yaml/ validates, and the paper defaults are what a bare spec gets."""

from __future__ import annotations

import pytest

from megatron_camopd.config import ExperimentSpec, dump_yaml, load_spec

from .conftest import SPEC_FILES, VALID, YAML_DIR


def test_expected_specs_exist() -> None:
    names = {str(p.relative_to(YAML_DIR)) for p in SPEC_FILES}
    assert names >= {
        "camopd_roleplay_qwen3_4b.yaml",
        "camopd_medical_qwen3_8b.yaml",
        "mopd_vanilla_1to1.yaml",
        "mopd_vanilla_3to1.yaml",
        "uniopd_math.yaml",
        "baselines/relaxed_opd.yaml",
        "baselines/selectkd.yaml",
        "baselines/exopd.yaml",
        "examples/camopd_tiny_cpu.yaml",
    }


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_shipped_spec_validates_and_round_trips(path, tmp_path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, ExperimentSpec)
    dumped = tmp_path / "resolved.yaml"
    dump_yaml(spec, dumped)
    assert load_spec(dumped) == spec


def test_production_specs_use_paper_settings() -> None:
    for name, tp, pp in (("camopd_roleplay_qwen3_4b.yaml", 2, 1), ("camopd_medical_qwen3_8b.yaml", 2, 2)):
        spec = load_spec(YAML_DIR / name)
        assert spec.method.name == "camopd" and spec.schedule.mode == "alternate" and spec.schedule.n_g == 3
        assert (spec.rollout.prompts_per_step, spec.rollout.n_samples, spec.train.steps) == (512, 1, 120)
        assert spec.train.lr == 2e-6 and spec.rollout.max_new_tokens == 32768 and spec.data.max_prompt_tokens == 4096
        assert (spec.launcher.nodes, spec.launcher.gpus_per_node) == (4, 8)
        assert (spec.parallel.tp, spec.parallel.pp) == (tp, pp) and spec.parallel.fp8.enabled
        assert all(t.kind == "discovery" for t in spec.teachers.values())
    ratios = {p.name: load_spec(p).schedule.mix_ratio for p in SPEC_FILES if p.name.startswith("mopd_vanilla")}
    assert ratios == {"mopd_vanilla_1to1.yaml": [1.0, 1.0], "mopd_vanilla_3to1.yaml": [3.0, 1.0]}


def test_bare_spec_gets_paper_defaults(write_spec) -> None:
    spec = load_spec(write_spec(VALID))
    m = spec.method
    assert (m.loss, m.a_max, m.is_weight, m.eps_low, m.eps_high, m.is_cap) == ("pg", 5.0, "mask", 0.5, 5.0, 2.0)
    assert m.topk == 16
    assert (m.selection, m.rho_g, m.rho_d, m.r_g, m.r_d) == (True, 0.8, 0.8, 2.0, 1.0)
    u = m.uniopd
    assert (u.delta_star, u.scope, u.margin_mode, u.shift) == (0.4, "group", "mean", "spread")
    assert (u.calibration, u.balance_ratio, u.offline_n) == ("shift", 1.0, 8)
    assert (m.relaxed.lam, m.relaxed.beta, m.selectkd.k, m.selectkd.beta, m.exopd.lam) == (0.2, 0.5, 5, 0.01, 1.25)
    assert (spec.schedule.mode, spec.schedule.n_g) == ("alternate", 3)
    assert (spec.train.steps, spec.train.lr, spec.train.clip_grad) == (120, 2e-6, 1.0)
    assert (spec.rollout.prompts_per_step, spec.rollout.n_samples, spec.rollout.max_new_tokens) == (512, 1, 32768)
    assert spec.data.max_prompt_tokens == 4096 and spec.seq_length == 4096 + 32768
    assert spec.logging.wandb.run_name == "unit"


def test_method_dependent_defaults(write_spec) -> None:
    mopd = load_spec(write_spec(VALID), ["method.name=mopd", "schedule.mix_ratio=[3, 1]"])
    assert (mopd.method.selection, mopd.schedule.mode) == (False, "mixed")
    uni = VALID.replace("      branch: general\n", "      verifier: exact\n").replace(
        "      branch: domain\n", "      verifier: numeric\n"
    )
    spec = load_spec(write_spec(uni), ["method.name=uniopd"])
    assert spec.rollout.n_samples == 16 and spec.schedule.mode == "mixed"
