"""Typed, validated parameter sections and their field checks, shared by the spec (`config/`) and the algorithms'
own parameters (`algo/`: a method's parameters are one `Section` next to its maths, loaded into the spec's
`method` section through the registry), so each value is checked in one place.

Every section of an experiment spec is a dataclass deriving from `Section`. Its `__post_init__` checks each
field's value against the field's annotation (so a section built directly in Python is as strict as one loaded
from YAML; every float must be finite: YAML's `.inf`/`.nan` are refused) and then runs the section's own
`validate()`. Failures raise `FieldError`, a `SpecError` that names the field relative to the section; the loader
prefixes the section's dotted path and the file:line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, Union

from megatron_camopd.errors import SpecError


def path_field(default: Any = None, keep: tuple[str, ...] = ()) -> Any:
    """A path-valued dataclass field; string values in `keep` (e.g. 'auto') are left as they are."""
    return dataclasses.field(default=default, metadata={"path": True, "keep": keep})  # MISSING: required


def as_float(value: int) -> float:
    """An integer given for a float field, as a float; one too large for a float is refused like `.inf`."""
    try:
        return float(value)
    except OverflowError:  # > 1.8e308; such an integer may be too long to print (sys.int_info)
        digits = int(value.bit_length() * math.log10(2)) + 1
        raise FieldError("", f"must be a finite number, got an integer of about {digits} digits") from None


class FieldError(SpecError):
    """A field's value is invalid; `field` is dotted and relative to the section that raised it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached)."""
    return typing.get_type_hints(cls)


def optional_inner(tp: Any) -> Any:
    """`X` for `X | None` (and `Optional[X]`), else `tp` unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def type_name(tp: Any) -> str:
    """A short human name for an annotation, used in error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def describe(value: Any) -> str:
    """`value` shown with its YAML-ish type, for 'got ...' messages."""
    kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return kind
    return f"{kind} {value!r}"


def type_problem(value: Any, tp: Any) -> str | None:
    """Why `value` does not fit annotation `tp` (None when it fits). Shallow for nested sections."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if any(type_problem(value, a) is None for a in args):
            return None
        if float in args and isinstance(value, float):
            return type_problem(value, float)
        return f"expected {type_name(tp)}, got {describe(value)}"
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(type(value) is type(a) and value == a for a in allowed):
            return None
        return f"must be {type_name(tp)}, got {describe(value)}"
    if tp is type(None):
        return None if value is None else f"expected null, got {describe(value)}"
    if origin is list:
        if not isinstance(value, list):
            return f"expected {type_name(tp)}, got {describe(value)}"
        for i, item in enumerate(value):
            problem = type_problem(item, typing.get_args(tp)[0])
            if problem:
                return f"item {i}: {problem}"
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return f"expected {type_name(tp)}, got {describe(value)}"
        for key, item in value.items():
            if not isinstance(key, str):
                return f"keys must be strings, got {describe(key)}"
            problem = type_problem(item, typing.get_args(tp)[1])
            if problem:
                return f"{key}: {problem}"
        return None
    if tp is float and isinstance(value, float) and not math.isfinite(value):  # YAML's .inf / .nan
        return f"must be a finite number, got {describe(value)}"
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, float),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is None:  # a nested section
        ok = lambda v: isinstance(v, tp)  # noqa: E731
    return None if ok(value) else f"expected {type_name(tp)}, got {describe(value)}"


class Section:
    """Base of every spec section: type-checks fields from annotations, then runs `validate()`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass; the base isn't
            hints = type_hints(type(self))  # type: ignore[arg-type]  # lru_cache's stub wants Hashable; classes are
            problem = type_problem(getattr(self, f.name), hints[f.name])
            if problem:
                raise FieldError(f.name, problem)
        self.validate()

    def validate(self) -> None:
        """Section-specific range and consistency checks; raise `FieldError` naming the field."""

    @classmethod
    def schema(cls) -> type:
        """The dataclass the loader builds for a field annotated with this class (itself; the spec's `method`
        section answers with the schema its registered methods' parameters make up)."""
        return cls


def check(condition: bool, field: str, message: str) -> None:
    """Raise `FieldError(field, message)` unless `condition`."""
    if not condition:
        raise FieldError(field, message)


def positive(section: Any, *names: str) -> None:
    """Each named numeric field (None allowed) must be > 0."""
    for name in names:
        value = getattr(section, name)
        check(value is None or value > 0, name, f"must be > 0, got {value!r}")


def non_negative(section: Any, *names: str) -> None:
    """Each named numeric field (None allowed) must be >= 0."""
    for name in names:
        value = getattr(section, name)
        check(value is None or value >= 0, name, f"must be >= 0, got {value!r}")


def in_range(section: Any, name: str, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    """The named field (None allowed) must lie in the interval; the message prints it as (a, b] etc."""
    value = getattr(section, name)
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    check(above and below, name, f"must be in {interval}, got {value!r}")
