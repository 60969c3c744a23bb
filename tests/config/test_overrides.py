"""Dotted overrides are applied to the raw YAML before validation; paths resolve against the spec's directory."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_camopd.config import dump_yaml, load_spec
from megatron_camopd.errors import SpecError

from .conftest import VALID


def test_overrides_set_scalars_lists_and_nested_values(write_spec) -> None:
    spec = load_spec(
        write_spec(),
        [
            "method.rho_g=0.6",
            "parallel.tp=2",
            "parallel.fp8.enabled=true",
            "schedule.n_g=4",
            "rollout.stop_token_ids=[1, 2]",
            "method.a_max=null",
            "teachers.domain.urls.1=http://h:9",
            "description=a b=c",
        ],
    )
    assert spec.method.rho_g == 0.6 and isinstance(spec.method.rho_g, float)
    assert (spec.parallel.tp, spec.parallel.fp8.enabled, spec.schedule.n_g) == (2, True, 4)
    assert spec.rollout.stop_token_ids == [1, 2] and spec.method.a_max is None
    assert spec.teachers["domain"].urls == ["http://127.0.0.1:30000", "http://h:9"]
    assert spec.description == "a b=c"


def test_override_can_fix_an_invalid_file(write_spec) -> None:
    path = write_spec(VALID.replace("  rho_g: 0.8", "  rho_g: 1.5"))
    with pytest.raises(SpecError, match=r"spec\.yaml:\d+: method\.rho_g: must be in"):
        load_spec(path)
    assert load_spec(path, ["method.rho_g=0.9"]).method.rho_g == 0.9


def test_override_that_breaks_a_valid_file_names_the_override(write_spec) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(), ["parallel.tp=0"])
    assert str(info.value) == "override 'parallel.tp=0': parallel.tp: must be > 0, got 0"
    with pytest.raises(SpecError, match=r"^override 'train.steps=abc': train.steps: expected int, got string 'abc'$"):
        load_spec(write_spec(), ["train.steps=abc"])
    with pytest.raises(SpecError, match=r"routing.med: teacher 'ghost' is not defined"):
        load_spec(write_spec(), ["routing.med=ghost"])


def test_override_can_add_a_new_mapping_entry(write_spec) -> None:
    spec = load_spec(write_spec(), ["teachers.extra={urls: ['http://x:1']}", "routing.extra=extra"])
    assert spec.teachers["extra"].kind == "http" and spec.routing["extra"] == "extra"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("method.rhog=0.5", "method.rhog: unknown key; did you mean 'rho_g'?"),
        ("paralel.tp=2", "paralel: unknown key; did you mean 'parallel'?"),
        ("parallel.fp8.enable=true", "parallel.fp8.enable: unknown key; did you mean 'enabled'?"),
        ("data.streams.2.path=x.jsonl", "data.streams: no item '2' (the list has 2 items)"),
        ("data.streams.first.path=x.jsonl", "no item 'first'"),
        ("method.rho_g.x=1", "method.rho_g is a float and has no key 'x'"),
        ("method.rho_g", "expected dotted.key=value"),
        ("=3", "expected dotted.key=value"),
        ("method.rho_g=[0.5", "malformed YAML"),
    ],
)
def test_bad_overrides(write_spec, override, fragment) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(), [override])
    assert fragment in str(info.value) and f"override {override!r}" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=[1, 2]", "model.dtype=bf16"], "override 'model.dtype=bf16': model: is list, not a mapping"),
        (
            ["teachers=[1]", "teachers.g.timeout_s=3"],
            "override 'teachers.g.timeout_s=3': teachers: is list, not a mapping",
        ),
    ],
)
def test_override_into_a_list_where_a_mapping_belongs(write_spec, overrides, message) -> None:
    with pytest.raises(SpecError) as info:  # was a raw TypeError (a list indexed by a str key)
        load_spec(write_spec(), overrides)
    assert str(info.value) == message


def test_paths_resolve_against_the_spec_directory(write_spec, tmp_path, monkeypatch) -> None:
    spec = load_spec(write_spec())
    assert spec.model.hf_path == str(tmp_path / "models" / "student")
    assert spec.data.streams[1].path == str(tmp_path / "data" / "domain.jsonl")
    assert spec.checkpoint.dir == str(tmp_path / "out" / "ckpt") and spec.checkpoint.resume == "auto"
    monkeypatch.chdir(tmp_path / "..")
    spec = load_spec(
        write_spec(),
        ["data.streams.0.path=rel/g.jsonl", "checkpoint.resume=ckpts/iter_5", "model.checkpoint=/abs/ckpt"],
    )
    assert spec.data.streams[0].path == os.path.join(os.getcwd(), "rel", "g.jsonl")  # overrides: working dir
    assert spec.checkpoint.resume == os.path.join(os.getcwd(), "ckpts", "iter_5")
    assert spec.model.checkpoint == "/abs/ckpt"


def test_dump_round_trips_with_overrides(write_spec, tmp_path) -> None:
    spec = load_spec(write_spec(), ["method.a_max=null", "train.lr=3e-7", "launcher.nodes=2", "parallel.tp=4"])
    text = dump_yaml(spec)
    assert "a_max: null" in text and text.startswith("name: unit\ndescription:")
    again = load_spec(write_spec(text, "dumped.yaml"))
    assert again == spec and again.to_dict() == spec.to_dict()


@settings(max_examples=40, deadline=None)
@given(rho=st.floats(min_value=-2.0, max_value=3.0, allow_nan=False), tp=st.integers(min_value=-2, max_value=8))
def test_override_range_checks_match_the_spec(tmp_path_factory, rho: float, tp: int) -> None:
    path = tmp_path_factory.mktemp("h") / "spec.yaml"
    path.write_text(VALID)
    overrides = [f"method.rho_d={rho!r}", f"parallel.tp={tp}"]
    if 0 < rho <= 1 and tp >= 1:
        spec = load_spec(path, overrides)
        assert (spec.method.rho_d, spec.parallel.tp) == (rho, tp)
    else:
        with pytest.raises(SpecError, match=r"method\.rho_d: must be in \(0, 1\]|parallel\.tp: must be > 0"):
            load_spec(path, overrides)
