"""Spec errors name the dotted field and the file:line it comes from."""

from __future__ import annotations

import re

import pytest

from megatron_camopd.config import MethodConfig, TeacherConfig, load_spec
from megatron_camopd.errors import SpecError

from .conftest import VALID


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def error_of(write_spec, text: str, overrides: list[str] | None = None) -> str:
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_top_level_key_names_key_line_and_suggestion(write_spec) -> None:
    text = VALID + "schedual:\n  n_g: 2\n"
    msg = error_of(write_spec, text)
    assert msg.startswith(f"{write_spec()}".replace("spec.yaml", "spec.yaml") + f":{line_of(text, 'schedual')}: ")
    assert "schedual: unknown key; did you mean 'schedule'?" in msg


def test_unknown_nested_key_names_dotted_key_and_line(write_spec) -> None:
    text = VALID.replace("  rho_g: 0.8\n", "  rho_g: 0.8\n  rhog_d: 0.5\n")
    msg = error_of(write_spec, text)
    assert re.search(rf"spec\.yaml:{line_of(text, 'rhog_d')}: method\.rhog_d: unknown key; did you mean", msg)


def test_unknown_key_inside_list_item(write_spec) -> None:
    text = VALID.replace("      branch: domain\n", "      branch: domain\n      wieght: 2\n")
    msg = error_of(write_spec, text)
    assert f":{line_of(text, 'wieght')}: data.streams.1.wieght: unknown key; did you mean 'weight'?" in msg


@pytest.mark.parametrize(
    ("old", "new", "field", "fragment"),
    [
        ("  rho_g: 0.8", "  rho_g: 1.5", "method.rho_g", "must be in (0, 1], got 1.5"),
        ("  rho_g: 0.8", "  rho_g: 0", "method.rho_g", "must be in (0, 1], got 0.0"),
        ("  rho_g: 0.8", "  rho_g: high", "method.rho_g", "expected float, got string 'high'"),
        ("  rho_g: 0.8", "  rho_g: true", "method.rho_g", "expected float, got bool True"),
        ("  dtype: fp32", "  dtype: fp64", "model.dtype", "must be one of 'fp32', 'bf16', 'fp16'"),
        ("  dtype: fp32", "  dtype: [fp32]", "model.dtype", "got list"),
        ("  name: camopd", "  name: camopdd", "method.name", "did you mean 'camopd'?"),
        ("      branch: domain", "      branch: domian", "data.streams.1.branch", "got string 'domian'"),
        ("  rho_g: 0.8", "  eps_low: 6.0", "method.eps_low", "must be <= eps_high (5.0), got 6.0"),
        ("  med: domain", "  med: nobody", "routing.med", "teacher 'nobody' is not defined"),
        ("  med: domain", "  other: domain", "data.streams.1.domain", "domain 'med' is not routed"),
        (
            '    urls: ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]',
            "    urls: [localhost]",
            "teachers.domain.urls.0",
            "must look like http://host:port",
        ),
        ("      path: data/domain.jsonl", "      path: data/domain.csv", "data.streams.1.path", ".jsonl or .parquet"),
        ("      branch: general\n", "", "data.streams.0.branch", "give every stream a branch"),
    ],
)
def test_bad_value_names_field_and_line(write_spec, old, new, field, fragment) -> None:
    text = VALID.replace(old, new)
    assert text != VALID
    msg = error_of(write_spec, text)
    assert f": {field}: " in msg and fragment in msg
    # the error points at the offending value's line (the stream's domain for an unrouted domain)
    at = "domain: med" if "not routed" in fragment else new.strip() or "- name: g"
    assert msg.split(": ")[0].endswith(f"spec.yaml:{line_of(text, at)}")


@pytest.mark.parametrize(
    ("section", "field", "fragment"),
    [
        ("train:\n  lr: -1.0e-6\n", "train.lr", "must be > 0"),
        ("train:\n  steps: 1.5\n", "train.steps", "expected int, got float 1.5"),
        ("train:\n  steps: '120'\n", "train.steps", "expected int, got string '120'"),
        ("parallel:\n  tp: 0\n", "parallel.tp", "must be > 0, got 0"),
        ("parallel:\n  vpp: 2\n", "parallel.vpp", "needs pp >= 2"),
        ("parallel:\n  sequence_parallel: true\n", "parallel.sequence_parallel", "needs tp > 1"),
        ("launcher:\n  nodes: 1\n  gpus_per_node: 3\nparallel:\n  tp: 2\n", "parallel.tp", "not a multiple"),
        ("parallel:\n  dp: 3\nlauncher:\n  nodes: 1\n", "parallel.dp", "must equal the launcher world size 8"),
        ("schedule:\n  mode: mixed\n", "schedule.mix_ratio", "needs mix_ratio"),
        ("model:\n  seq_length: 100\n", "model", "unknown"),  # a second `model:` key is a duplicate
        ("logging:\n  wandb: {enabled: true, mode: disabled}\n", "logging.wandb.mode", "'disabled' but enabled"),
        ("launcher:\n  time: 8 hours\n", "launcher.time", "Slurm time"),
        ("rollout:\n  top_p: 0\n", "rollout.top_p", "must be in (0, 1]"),
    ],
)
def test_section_errors(write_spec, section, field, fragment) -> None:
    msg = error_of(write_spec, VALID + section)
    if field == "model":
        assert "model: duplicate key" in msg
        return
    assert f": {field}: " in msg and fragment in msg, msg


def test_missing_required_fields(write_spec) -> None:
    no_checkpoint = VALID.replace("checkpoint:\n  dir: out/ckpt\n", "")
    assert "checkpoint: missing required field" in error_of(write_spec, no_checkpoint)
    msg = error_of(write_spec, VALID.replace("      domain: general\n", ""))
    assert "data.streams.0.domain: missing required field" in msg


def test_method_cross_checks(write_spec) -> None:
    no_domain_stream = VALID.replace("      branch: domain\n", "      branch: general\n")
    assert "camopd needs a stream with branch: domain" in error_of(write_spec, no_domain_stream)
    msg = error_of(write_spec, VALID, ["method.loss=topk", "method.topk=0"])
    assert "method.topk: the topk loss needs topk >= 1" in msg
    msg = error_of(
        write_spec,
        VALID,
        [
            "method.name=uniopd",
            "data.streams.0.verifier=exact",
            "data.streams.1.verifier=exact",
            "rollout.n_samples=1",
            "schedule.mix_ratio=[1, 1]",
        ],
    )
    assert "rollout.n_samples: uniopd's groups need n_samples >= 2" in msg
    msg = error_of(write_spec, VALID, ["method.name=exopd", "method.loss=topk", "schedule.mix_ratio=[1, 1]"])
    assert "method.loss: exopd trains with loss 'pg', got 'topk'" in msg
    msg = error_of(write_spec, VALID, ["method.name=selectkd", "method.loss=topk", "schedule.mix_ratio=[1, 1]"])
    assert "method.loss: selectkd trains with loss 'pg'" in msg  # refused here, not after the models load


def test_malformed_yaml_reports_line(write_spec) -> None:
    text = VALID.replace("  rho_g: 0.8\n", "  rho_g: [0.8\n  r_g: 2\n")
    msg = error_of(write_spec, text)
    assert re.search(r"spec\.yaml:\d+: malformed YAML: ", msg)
    assert f"starts at line {line_of(text, 'rho_g')}" in msg
    tabs = VALID.replace("  rho_g: 0.8\n", "\trho_g: 0.8\n")
    assert f"spec.yaml:{line_of(tabs, 'rho_g')}: malformed YAML" in error_of(write_spec, tabs)
    assert "the spec is empty" in error_of(write_spec, "# nothing\n")
    assert "spec.yaml:1: the spec must be a mapping" in error_of(write_spec, "- a\n- b\n")


def test_yaml_12_scalars(write_spec) -> None:
    """`off` stays a string (YAML 1.1 would make it false) and `2e-6` is a float (1.1 would make it a string)."""
    spec = load_spec(write_spec(VALID + "logging:\n  progress: off\ntrain:\n  lr: 2e-6\n"))
    assert spec.logging.progress == "off" and spec.train.lr == 2e-6
    assert "expected int, got string '1:30'" in error_of(write_spec, VALID + "train:\n  steps: 1:30\n")


def test_sections_built_in_python_are_checked() -> None:
    with pytest.raises(SpecError, match=r"^rho_g: must be in \(0, 1\], got 1.5$"):
        MethodConfig.schema()(name="camopd", rho_g=1.5)
    with pytest.raises(SpecError, match=r"^topk: expected int, got string"):
        MethodConfig.schema()(name="camopd", topk="16")
    with pytest.raises(SpecError, match="exactly one of"):
        TeacherConfig(hf_path="/m", urls=["http://h:1"])
    assert TeacherConfig(urls=["http://h:1"]).kind == "http"
