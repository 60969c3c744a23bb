"""YAML reading that keeps line numbers, with YAML 1.2 scalar rules, and YAML writing of resolved specs.

PyYAML implements YAML 1.1, where `off`/`no` are booleans, `8:00` is an integer and `2e-6` is a string. Specs use
the YAML 1.2 core schema instead (only true/false are booleans; `2e-6` is a float). The reader composes the node
tree, rejects duplicate keys, and records the 1-based line of every value under its key path, so later errors can
say `spec.yaml:12: method.rho_g: ...`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_camopd.errors import SpecError

KeyPath = tuple[str | int, ...]

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema booleans, integers and floats."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


@dataclass
class Origin:
    """Where each value of a raw spec came from: a line of the file or a command-line override."""

    file: str
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overrides: dict[KeyPath, str] = field(default_factory=dict)

    def from_override(self, path: KeyPath) -> bool:
        """Whether the value at `path` (or an enclosing value) was set by an override."""
        return any(path[:n] in self.overrides for n in range(len(path), -1, -1))

    def where(self, path: KeyPath) -> str:
        """`file:line` of the value at `path` (or its nearest enclosing value), or `override 'k=v'`."""
        for n in range(len(path), -1, -1):
            prefix = path[:n]
            if prefix in self.overrides:
                return f"override {self.overrides[prefix]!r}"
            if prefix in self.lines:
                return f"{self.file}:{self.lines[prefix]}"
        return self.file

    def forget_below(self, path: KeyPath) -> None:
        """Drop the recorded lines at and below `path` (an override replaced that value)."""
        for key in [k for k in self.lines if k[: len(path)] == path]:
            del self.lines[key]
        for key in [k for k in self.overrides if k[: len(path)] == path]:
            del self.overrides[key]


def dotted(path: KeyPath) -> str:
    """`('data', 'streams', 0, 'path')` -> `'data.streams.0.path'`."""
    return ".".join(str(p) for p in path)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _marked_error(where: str, err: yaml.YAMLError) -> SpecError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    detail = f"{context}: {problem}" if context else problem
    context_mark = getattr(err, "context_mark", None)
    if context_mark is not None and mark is not None and context_mark.line != mark.line:
        detail += f" (the construct starts at line {context_mark.line + 1})"
    return SpecError(f"{where}{line}: malformed YAML: {_one_line(detail)}")


def _to_python(loader: _Loader, node: yaml.Node, path: KeyPath, origin: Origin, where: str) -> Any:
    origin.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # `<<: *anchor` merge keys
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _to_python(loader, key_node, path + ("<key>",), origin, where)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise SpecError(f"{where}:{line}: {dotted(path) or '<top>'}: keys must be strings, got {key!r}")
            if key in out:
                raise SpecError(f"{where}:{line}: {dotted(path + (key,))}: duplicate key")
            out[key] = _to_python(loader, value_node, path + (key,), origin, where)
            origin.lines[path + (key,)] = line
        origin.lines.pop(path + ("<key>",), None)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(loader, item, path + (i,), origin, where) for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as err:
        raise _marked_error(where, err) from None


def parse_yaml(text: str, where: str, origin: Origin | None = None, root: KeyPath = ()) -> Any:
    """Parse one YAML document; record value lines under `root` in `origin`. Errors name `where:line`."""
    origin = origin if origin is not None else Origin(where)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _to_python(loader, node, root, origin, where)
    except yaml.YAMLError as err:
        raise _marked_error(where, err) from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Origin]:
    """Read a spec file into a raw mapping and the origin of each value."""
    where = str(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise SpecError(f"{where}: cannot read spec: {err.strerror or err}") from None
    origin = Origin(where)
    raw = parse_yaml(text, where, origin)
    if raw is None:
        raise SpecError(f"{where}: the spec is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{where}:1: the spec must be a mapping of sections, got {type(raw).__name__}")
    return raw, origin


def parse_scalar(text: str, where: str) -> Any:
    """Parse an override's value with the spec's YAML rules (`0.6` float, `2` int, `null`, `[1, 3]` list)."""
    return parse_yaml(text, where) if text.strip() else None


def dump_data(data: Any) -> str:
    """YAML text of plain data, keys in the given order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
