"""Hostile spec files (issue 16): alias bombs, recursive aliases, deep nesting, bad bytes, non-finite numbers.

Each must be refused by `camopd validate` with exit 2, one `file:line` message and no traceback, in well under a
second of parsing (the subprocess bound below includes the interpreter's start-up). Legitimate anchors and merge
keys still load as their expansion.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.config.yamlio import MAX_ALIASES, MAX_DEPTH
from megatron_camopd.errors import SpecError
from tests.helpers import run_cli

from .conftest import VALID


def _bomb(levels: int = 9, width: int = 9) -> str:
    """The classic billion-laughs document: `width ** levels` strings from ~300 bytes."""
    lines = ["a0: &a0 [" + ",".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _alias_chain(levels: int) -> str:
    """Each anchor nests the previous one 8 levels deeper: nesting grows only through the aliases."""
    lines = ["c0: &c0 x"]
    for i in range(1, levels):
        lines.append(f"c{i}: &c{i} " + "[" * 8 + f"*c{i - 1}" + "]" * 8)
    return "\n".join(lines) + "\n"


HOSTILE: dict[str, tuple[bytes, int, str]] = {  # name -> (file bytes, line named, words of the message)
    "billion_laughs": (_bomb().encode(), 5, "more than 10000 nodes"),
    "recursive_alias": (b"name: x\na: &a [*a]\n", 2, "recursive alias *a"),
    "recursive_mapping": (b"name: x\nm: &m\n  k: v\n  self: *m\n", 4, "recursive alias *m"),
    "deep_flow": (b"name: x\nd: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", 2, f"deeper than {MAX_DEPTH}"),
    "deep_block": (
        b"name: x\n" + b"".join(b"  " * i + f"k{i}:\n".encode() for i in range(200)),
        65,
        f"deeper than {MAX_DEPTH}",
    ),
    "deep_via_aliases": (_alias_chain(12).encode(), 9, f"deeper than {MAX_DEPTH}"),
    "many_aliases": (
        b"x: &x 1\nl: [" + b", ".join([b"*x"] * (MAX_ALIASES + 1)) + b"]\n",
        2,
        f"more than {MAX_ALIASES} alias uses",
    ),
    "latin1": (
        VALID.replace("name: unit", "name: unit\ndescription: caf\xe9 fran\xe7ais").encode("latin-1"),
        2,
        "not UTF-8",
    ),
    "nul_byte": (b'name: unit\ndescription: "a\x00b"\n', 2, "special characters"),
    "int_of_5000_digits": ((VALID + "train:\n  steps: " + "9" * 5000 + "\n").encode(), 29, "train.steps"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_spec_is_refused_fast_with_file_and_line(tmp_path: Path, name: str) -> None:
    data, line, words = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(data)
    start = time.monotonic()
    res = run_cli("validate", str(path), "-q", timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{path}:{line}:" in res.stderr and words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert elapsed < 5.0, f"{name}: {elapsed:.1f} s"


def test_parse_time_of_the_bomb_is_milliseconds(tmp_path: Path) -> None:
    """In process (no interpreter start-up): the refusal costs what composing ~300 bytes costs."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    start = time.perf_counter()
    with pytest.raises(SpecError, match="refused YAML"):
        load_spec(path)
    assert time.perf_counter() - start < 0.5


def test_overrides_get_the_same_limits(write_spec) -> None:
    with pytest.raises(SpecError, match=f"override .*deeper than {MAX_DEPTH}"):
        load_spec(write_spec(VALID), ["description=" + "[" * 500 + "]" * 500])


def test_anchors_and_merge_keys_within_the_limits_load_as_their_expansion(write_spec) -> None:
    urls = '    urls: ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]\n'
    general = "    hf_path: models/general\n"
    anchors = VALID.replace(general, general + "    timeout_s: &t 30.0\n    retries: &r 5\n").replace(
        urls, urls + "    timeout_s: *t\n    retries: *r\n"
    )
    plain = VALID.replace(general, general + "    timeout_s: 30.0\n    retries: 5\n").replace(
        urls, urls + "    timeout_s: 30.0\n    retries: 5\n"
    )
    merged = VALID.replace(
        "  general:\n" + general,
        "  general: &g\n" + general + "    timeout_s: 30.0\n  backup:\n    <<: *g\n    hf_path: models/backup\n",
    )
    a = load_spec(write_spec(anchors, "anchors.yaml")).to_dict()
    assert a == load_spec(write_spec(plain, "plain.yaml")).to_dict() and a["teachers"]["domain"]["retries"] == 5
    m = load_spec(write_spec(merged, "merged.yaml"))
    assert m.teachers["backup"].timeout_s == 30.0 and m.teachers["backup"].hf_path.endswith("models/backup")


FLOAT_FIELDS = {  # dotted field -> how to put VALUE into the spec text (`{v}`), and the line it lands on
    "train.lr": (lambda v: VALID + f"train:\n  lr: {v}\n", 29),
    "train.clip_grad": (lambda v: VALID + f"train:\n  clip_grad: {v}\n", 29),
    "train.adam_eps": (lambda v: VALID + f"train:\n  adam_eps: {v}\n", 29),
    "train.weight_decay": (lambda v: VALID + f"train:\n  weight_decay: {v}\n", 29),
    "method.r_g": (lambda v: VALID.replace("  rho_g: 0.8\n", f"  rho_g: 0.8\n  r_g: {v}\n"), 26),
    "method.a_max": (lambda v: VALID.replace("  rho_g: 0.8\n", f"  rho_g: 0.8\n  a_max: {v}\n"), 26),
    "teachers.general.weight": (
        lambda v: VALID.replace("    hf_path: models/general\n", f"    hf_path: models/general\n    weight: {v}\n"),
        8,
    ),
    "data.streams.1.weight": (
        lambda v: VALID.replace("      domain: med\n", f"      domain: med\n      weight: {v}\n"),
        22,
    ),
    "schedule.mix_ratio.1": (
        lambda v: VALID.replace("name: camopd", "name: mopd") + f"schedule:\n  mix_ratio: [1, {v}]\n",
        29,
    ),
    "rollout.temperature": (lambda v: VALID + f"rollout:\n  temperature: {v}\n", 29),
}


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN", "1e400", "9" * 400])
@pytest.mark.parametrize("field", sorted(FLOAT_FIELDS))
def test_non_finite_floats_are_refused_with_field_file_and_line(write_spec, field: str, value: str) -> None:
    text, line = FLOAT_FIELDS[field]
    path = write_spec(text(value))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:{line}: {field}: must be a finite number"), str(info.value)


@pytest.mark.parametrize("value", [".inf", ".nan", "9" * 400])
def test_non_finite_override_is_refused(write_spec, value: str) -> None:
    with pytest.raises(SpecError, match=r"override 'train.clip_grad=.*': train.clip_grad: must be a finite number"):
        load_spec(write_spec(VALID), [f"train.clip_grad={value}"])
