"""The spec and CLI defects of issue 13, each caught by the spec loader (before any model loads) or handled right."""

from __future__ import annotations

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.errors import SpecError

from .conftest import VALID, YAML_DIR

MOPD = ["method.name=mopd"]
FLAGSHIP = YAML_DIR / "camopd_medical_qwen3_8b.yaml"


def spec_error(write_spec, overrides: list[str], path=None) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path or write_spec(VALID), overrides)
    return str(info.value)


@pytest.mark.parametrize("ratio", ["[1.5, 0.5]", "[0.75, 0.25]", "[3, 1]"])
def test_fractional_mix_ratio_is_the_ratio_it_says(write_spec, ratio: str) -> None:
    """[1.5, 0.5] used to train 1:0 (ints truncated) and [0.75, 0.25] to fail once every model had loaded."""
    from megatron_camopd.loop.session import branch_schedule

    spec = load_spec(write_spec(VALID), [*MOPD, f"schedule.mix_ratio={ratio}"])
    assert spec.schedule.split(512) == (384, 128)
    schedule = branch_schedule(spec)  # what the session builds, from the spec alone
    assert schedule.split(512) == (384, 128) and schedule.split(3) == (2, 1)


def test_mix_ratio_that_starves_a_branch_is_refused(write_spec) -> None:
    msg = spec_error(write_spec, [*MOPD, "schedule.mix_ratio=[1000, 1]", "rollout.prompts_per_step=8"])
    assert "schedule.mix_ratio" in msg and "domain branch 0 of rollout.prompts_per_step = 8" in msg
    load_spec(write_spec(VALID), [*MOPD, "schedule.mix_ratio=[1, 0]"])  # 1:0 on purpose is fine


def test_on_bad_row_from_the_readme_is_a_data_field(write_spec) -> None:
    from megatron_camopd.loop.session import stream_arguments

    spec = load_spec(write_spec(VALID), ["data.on_bad_row=skip"])
    assert all(kwargs["on_bad_row"] == "skip" for _, _, kwargs in stream_arguments(spec))
    assert "did you mean 'on_bad_row'" in spec_error(write_spec, ["data.on_bad_rows=skip"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr=.inf", "train.lr"),
        ("method.a_max=.nan", "method.a_max"),
        ("teachers.general.weight=-.inf", "teachers.general.weight"),
        ("teachers.domain.timeout_s=.inf", "teachers.domain.timeout_s"),
        ("schedule.mix_ratio=[.inf, 1]", "schedule.mix_ratio"),
    ],
)
def test_non_finite_numbers_are_refused(write_spec, override: str, field: str) -> None:
    msg = spec_error(write_spec, [override])
    assert field in msg and "finite" in msg


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (
            ["teachers.general.serve.context_length=4096"],
            "teachers.general.serve.context_length",
            "the teacher scores a prompt plus a rollout",
        ),
        (["teachers.medical.serve.port=30000"], "teachers.medical.serve.port", "already used"),
        (["launcher.time=00:20:00"], "launcher.signal_lead_s", "shorter than the job's time limit"),
        (["teachers.general.serve.tp=2"], "teachers.general.serve.dp", "tp * dp = 16 GPUs per server"),
        (["parallel.recompute_modules=[mlp]"], "parallel.recompute_modules", "selective only"),
        (
            ["parallel.recompute=selective", "parallel.recompute_modules=[layernorm]"],
            "parallel.recompute_modules",
            "FP8 delayed scaling",
        ),
        (["teachers.general.serve=null", "teachers.general.dtype=fp16"], "teachers.general.dtype", "in-process"),
        (["launcher.health_check_timeout_s=400"], "launcher.health_check_timeout_s", "shorter than teacher_dead_s"),
        (["rollout.engine=sglang", "rollout.sglang.port=30001"], "rollout.sglang.port", "already used"),
        (
            ["rollout.engine=sglang", "rollout.sglang.dp=8"],
            "rollout.sglang.dp",
            "weight_sync: distributed needs servers with dp = 1",
        ),
        (
            ["rollout.engine=sglang", "rollout.sglang.context_length=36863"],
            "rollout.sglang.context_length",
            "must be >= 36864: it holds a prompt plus a rollout",
        ),
        (
            ["parallel.sequence_parallel=true", "parallel.tp=1", "parallel.pp=1"],
            "parallel.sequence_parallel",
            "needs tp > 1",
        ),
    ],
)
def test_cross_field_consistency(overrides: list[str], field: str, words: str) -> None:
    msg = spec_error(None, overrides, FLAGSHIP)
    assert field in msg and words in msg, msg


def test_offline_balance_defaults_follow_the_shape() -> None:
    """Mirrored-J upsamples never-solved prompts by default (offline_low used to default to 1); U does not."""
    from megatron_camopd.rollout.offline import balance_plan

    uni = load_spec(YAML_DIR / "uniopd_math.yaml").method.uniopd
    assert uni.offline_low is None
    counts = [0] * 10 + [3] * 10 + [uni.offline_n] * 2  # a mirrored-J histogram
    shape, res = balance_plan(counts, uni)
    assert shape == "mirrored_j" and res.hist_after[0] == uni.offline_factor * 10 and res.hist_after[uni.offline_n] == 2
    u = load_spec(YAML_DIR / "uniopd_math.yaml", ["method.uniopd.offline_shape=u"]).method.uniopd
    assert balance_plan(counts, u)[1].hist_after[0] == 10
