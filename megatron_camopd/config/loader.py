"""Strict spec loading: YAML + dotted overrides -> raw mapping -> typed, validated `ExperimentSpec`.

Overrides (`method.rho_g=0.6 data.streams.0.path=x.jsonl`) are parsed as YAML values and applied to the raw
mapping before any section is built, so an override can repair an invalid file and every check sees the final
values. Unknown keys (in the file or an override) are errors with a did-you-mean suggestion. Values are checked
against the section annotations (an int may stand for a float; a string is never a number; a bool is never an
int). Relative paths are resolved against the spec file's directory (against the working directory for
override values). Every error reads `file:line: dotted.field: problem`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Sequence
from typing import Any, Literal

from megatron_camopd.checks import (
    FieldError,
    Section,
    as_float,
    describe,
    optional_inner,
    type_hints,
    type_name,
    type_problem,
)
from megatron_camopd.config.spec import ExperimentSpec
from megatron_camopd.config.yamlio import KeyPath, Origin, dotted, dump_data, parse_scalar, read_yaml
from megatron_camopd.errors import SpecError


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Read, override, type-check and validate a spec file."""
    raw, origin = read_yaml(path)
    for text in overrides:
        apply_override(raw, text, origin)
    base_dir = os.path.dirname(os.path.abspath(path))
    return build_spec(raw, origin, base_dir)


def build_spec(raw: dict[str, Any], origin: Origin, base_dir: str) -> ExperimentSpec:
    """Build the spec from a raw mapping (errors located through `origin`)."""
    return _Builder(origin, base_dir).build(ExperimentSpec, raw, ())


def dump_yaml(spec: ExperimentSpec, path: str | os.PathLike[str] | None = None) -> str:
    """The resolved spec as YAML text; also written to `path` when given."""
    text = dump_data(spec.to_dict())
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text


def _schema(tp: Any) -> Any:
    """The dataclass a section annotation stands for (`Section.schema`: the `method` section's registry-made one)."""
    return tp.schema() if isinstance(tp, type) and issubclass(tp, Section) else tp


def _suggest(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(choices)})"


def apply_override(raw: dict[str, Any], text: str, origin: Origin) -> None:
    """Apply one `dotted.key=value` override to the raw mapping, checking the key against the spec schema."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"override {text!r}: expected dotted.key=value")
    where = f"override {text!r}"
    value = parse_scalar(value_text, where)
    parts = key.split(".")
    node: Any = raw
    tp: Any = ExperimentSpec
    path: KeyPath = ()
    for i, part in enumerate(parts):
        tp = _schema(optional_inner(tp))
        step: str | int = part
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise SpecError(f"{where}: {dotted(path + (part,))}: unknown key{_suggest(part, names)}")
            child_tp = type_hints(tp)[part]  # type: ignore[arg-type]  # lru_cache's stub wants Hashable; classes are
        elif typing.get_origin(tp) is dict:
            child_tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            length = len(node) if isinstance(node, list) else 0
            if not part.isdigit() or int(part) >= length:
                raise SpecError(f"{where}: {dotted(path)}: no item {part!r} (the list has {length} items)")
            step, child_tp = int(part), typing.get_args(tp)[0]
        else:
            raise SpecError(f"{where}: {dotted(path)} is a {type_name(tp)} and has no key {part!r}")
        # a key needs a mapping (a list here, e.g. `model: [1]`, would be indexed by a str); an item index
        # (int step) already saw a list in the length check above
        if isinstance(step, str) and not isinstance(node, dict):
            raise SpecError(f"{where}: {dotted(path)}: is {describe(node)}, not a mapping")
        path = path + (step,)
        if i == len(parts) - 1:
            node[step] = value
        else:
            child = node.get(step) if isinstance(node, dict) else node[step]
            if child is None:
                child = {}
                node[step] = child
            node, tp = child, child_tp
    origin.forget_below(path)
    origin.overrides[path] = text


class _Builder:
    """Converts raw values to annotated types, section by section, with located errors."""

    def __init__(self, origin: Origin, base_dir: str) -> None:
        self.origin = origin
        self.base_dir = base_dir

    def fail(self, path: KeyPath, message: str) -> SpecError:
        return SpecError(f"{self.origin.where(path)}: {dotted(path) or '<top>'}: {message}")

    def build(self, cls: type, raw: Any, path: KeyPath) -> Any:
        cls = _schema(cls)
        if not isinstance(raw, dict):
            raise self.fail(path, f"expected a mapping, got {describe(raw)}")
        hints = type_hints(cls)
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in by_name:
                raise self.fail(path + (key,), f"unknown key{_suggest(str(key), list(by_name))}")
        kwargs: dict[str, Any] = {}
        for name, f in by_name.items():
            if name in raw:
                kwargs[name] = self.convert(raw[name], hints[name], path + (name,), f.metadata)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.fail(path + (name,), "missing required field")
        try:
            return cls(**kwargs)
        except FieldError as err:
            parts = tuple(int(p) if p.isdigit() else p for p in err.field.split(".")) if err.field else ()
            raise self.fail(path + parts, err.message) from None

    def convert(self, value: Any, tp: Any, path: KeyPath, meta: Any = None) -> Any:
        origin = typing.get_origin(tp)
        if value is None and type_problem(None, tp) is None:
            return None
        inner = optional_inner(tp)
        if inner is not tp:
            return self.convert(value, inner, path, meta)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)  # type: ignore[arg-type]  # an annotation: a dataclass type, no instance
        if origin is list and isinstance(value, list):
            item_tp = typing.get_args(tp)[0]
            return [self.convert(v, item_tp, path + (i,)) for i, v in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            item_tp = typing.get_args(tp)[1]
            for key in value:
                if not isinstance(key, str):
                    raise self.fail(path + (key,), f"keys must be strings, got {describe(key)}")
            return {k: self.convert(v, item_tp, path + (k,)) for k, v in value.items()}
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = as_float(value)
            except FieldError as err:
                raise self.fail(path, err.message) from None
        problem = type_problem(value, tp)
        if problem:
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            if origin is Literal and isinstance(value, str) and close:
                problem += f"; did you mean {close[0]!r}?"
            raise self.fail(path, problem)
        if meta and meta.get("path") and isinstance(value, str) and value not in meta.get("keep", ()):
            base = os.getcwd() if self.origin.from_override(path) else self.base_dir
            value = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        return value
