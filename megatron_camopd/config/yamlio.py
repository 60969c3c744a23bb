"""YAML reading that keeps line numbers, with YAML 1.2 scalar rules, and YAML writing of resolved specs.

PyYAML implements YAML 1.1, where `off`/`no` are booleans, `8:00` is an integer and `2e-6` is a string. Specs use
the YAML 1.2 core schema instead (only true/false are booleans; `2e-6` is a float). The reader composes the node
tree, rejects duplicate keys, and records the 1-based line of every value under its key path, so later errors can
say `spec.yaml:12: method.rho_g: ...`.

Specs come from users and from generated sweeps, so the reader refuses hostile input quickly and with a line
number instead of hanging or crashing: a file that is not UTF-8, more than `MAX_SPEC_BYTES`, nesting deeper than
`MAX_DEPTH` (counting what aliases expand to), more than `MAX_ALIASES` alias uses, a document that expands to more
than `MAX_NODES` nodes (a "billion laughs" alias bomb is ~300 bytes), and recursive aliases (`a: &a [*a]`). The
limits are checked while the node graph is composed, before anything is expanded.
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
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


MAX_SPEC_BYTES = 4 << 20  # a spec is a few KB; refuse multi-megabyte files before parsing them
MAX_DEPTH = 64  # nesting levels, alias expansions included
MAX_NODES = 10_000  # nodes of the document once every alias is expanded
MAX_ALIASES = 100  # alias (`*name`) uses per document


class YAMLLimitError(yaml.MarkedYAMLError):
    """The document breaks one of the reader's safety limits (depth, size, aliases); marked at the offending line."""


class _SafeLoader(_Loader):
    """`_Loader` whose composer enforces the limits above while it builds the node graph.

    PyYAML's composer returns an alias as the anchored node itself, so the graph stays small while its expansion
    (what `_to_python` walks) may be exponential or, with a recursive alias, infinite. Each composed node records
    its expanded size and height; an alias adds its target's, so the limits hold for the expanded tree.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open_anchors: set[str] = set()  # anchors whose node is still being composed
        self._stats: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded height)
        self._heights: list[int] = []  # per open collection: the largest height of its children so far
        self._nodes = 0
        self._aliases = 0

    def _refuse(self, problem: str, mark: Any) -> YAMLLimitError:
        return YAMLLimitError(None, None, problem, mark)

    def _account(self, size: int, height: int, mark: Any) -> None:
        self._nodes += size
        if self._nodes > MAX_NODES:
            raise self._refuse(f"the document expands to more than {MAX_NODES} nodes (alias bomb?)", mark)
        if len(self._heights) + height > MAX_DEPTH:
            raise self._refuse(f"nesting deeper than {MAX_DEPTH} levels", mark)
        if self._heights:
            self._heights[-1] = max(self._heights[-1], height)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """PyYAML's merge (`<<: *a`), once per node; `node.own_start` is where the mapping's own pairs begin.

        Own keys override merged ones (YAML's merge-key rule); only a repeated own key is a duplicate.
        """
        if hasattr(node, "own_start"):
            return
        own = sum(1 for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge")
        super().flatten_mapping(node)
        node.own_start = len(node.value) - own  # type: ignore[attr-defined]  # our marker on PyYAML's node

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise self._refuse(
                    f"recursive alias *{event.anchor} (it refers to a value that contains it)", event.start_mark
                )
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise self._refuse(f"more than {MAX_ALIASES} alias uses", event.start_mark)
            node = super().compose_node(parent, index)  # raises on an undefined alias
            self._account(*self._stats[id(node)], event.start_mark)
            return node
        if len(self._heights) >= MAX_DEPTH:
            raise self._refuse(f"nesting deeper than {MAX_DEPTH} levels", event.start_mark)
        anchor = event.anchor
        if anchor is not None:
            self._open_anchors.add(anchor)
        before = self._nodes
        self._heights.append(0)
        node = super().compose_node(parent, index)
        height = self._heights.pop() + 1
        self._open_anchors.discard(anchor)
        self._stats[id(node)] = (self._nodes - before + 1, height)
        self._nodes = before  # _account adds the whole subtree back, with the height check
        self._account(*self._stats[id(node)], event.start_mark)
        return node


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


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _marked_error(where: str, err: yaml.YAMLError, text: str = "") -> SpecError:
    if isinstance(err, yaml.reader.ReaderError):  # unmarked: a control character such as NUL
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        return SpecError(f"{where}:{_line_of(text, err.position)}: malformed YAML: {err.reason} ({char})")
    if isinstance(err, YAMLLimitError):
        at = err.problem_mark.line + 1 if err.problem_mark is not None else 1
        return SpecError(f"{where}:{at}: refused YAML: {err.problem}")
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    detail = f"{context}: {problem}" if context else problem
    context_mark = getattr(err, "context_mark", None)
    if context_mark is not None and mark is not None and context_mark.line != mark.line:
        detail += f" (the construct starts at line {context_mark.line + 1})"
    return SpecError(f"{where}{line}: malformed YAML: {_one_line(detail)}")


def _to_python(loader: _SafeLoader, node: yaml.Node, path: KeyPath, origin: Origin, where: str) -> Any:
    origin.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # `<<: *anchor` merge keys: merged pairs first, then the node's own
        out: dict[Any, Any] = {}
        own: set[Any] = set()
        for i, (key_node, value_node) in enumerate(node.value):
            key = _to_python(loader, key_node, path + ("<key>",), origin, where)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise SpecError(f"{where}:{line}: {dotted(path) or '<top>'}: keys must be strings, got {key!r}")
            if key in own:
                raise SpecError(f"{where}:{line}: {dotted(path + (key,))}: duplicate key")
            if i >= node.own_start:  # type: ignore[attr-defined]  # set by flatten_mapping above
                own.add(key)
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
    except ValueError as err:  # e.g. an integer with more digits than Python converts (sys.int_info)
        raise SpecError(
            f"{where}:{node.start_mark.line + 1}: {dotted(path) or '<top>'}: "
            f"cannot read {node.value[:20]!r}...: {_one_line(str(err))}"
        ) from None


def parse_yaml(text: str, where: str, origin: Origin | None = None, root: KeyPath = ()) -> Any:
    """Parse one YAML document; record value lines under `root` in `origin`. Errors name `where:line`."""
    origin = origin if origin is not None else Origin(where)
    try:
        loader = _SafeLoader(text)  # the reader checks every character here
    except yaml.YAMLError as err:
        raise _marked_error(where, err, text) from None
    try:
        node = loader.get_single_node()
        return None if node is None else _to_python(loader, node, root, origin, where)
    except yaml.YAMLError as err:
        raise _marked_error(where, err, text) from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Origin]:
    """Read a spec file into a raw mapping and the origin of each value."""
    where = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{where}: cannot read spec: {err.strerror or err}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{where}: the spec is larger than {MAX_SPEC_BYTES >> 20} MiB; is this a spec file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise SpecError(
            f"{where}:{line}: the spec is not UTF-8 text (byte 0x{data[err.start]:02x} at column "
            f"{column}); save it as UTF-8"
        ) from None
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
