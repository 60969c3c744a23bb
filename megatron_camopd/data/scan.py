"""Scan every data stream of a spec before any model loads, so bad data stops a run in seconds, not hours in.

`scan_data(spec)` reads each `data.streams` file once, streaming (a JSONL line or a Parquet batch at a time; rows
are not kept), and applies the checks the prompt stream applies when it loads: UTF-8 text, one JSON object per
line, the format's required fields (`formats.parse_row`), and a domain that `routing` sends to a teacher (rows may
carry their own `domain`; an unrouted one would otherwise fail only when first drawn). With `data.on_bad_row:
error` the first bad row raises `DataError` naming `file:line`; with `skip` bad rows are counted and logged (the
prompt stream drops the same rows), and a stream left with no usable row is an error. The session runs it first.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megatron_camopd.data.formats import parse_row
from megatron_camopd.data.prompts import _BadJson, check_routed, read_rows
from megatron_camopd.errors import DataError

log = logging.getLogger("megatron_camopd")
MAX_EXAMPLES = 5


@dataclass
class StreamScan:
    """What the scan found in one stream's file."""

    name: str
    path: str
    rows: int = 0
    bad_rows: int = 0
    domains: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return self.rows - self.bad_rows


def routed_domains(spec: Any) -> frozenset[str] | None:
    """The domains `routing` sends to a teacher; None when the method uses no teacher (sft)."""
    return frozenset(spec.routing) if spec.method.method_class().needs_teachers else None


def scan_stream(
    path: str, fmt: str, default_domain: str, routed: frozenset[str] | None, on_bad_row: str, name: str = "prompts"
) -> StreamScan:
    """Scan one file; raises `DataError` at the first bad row when `on_bad_row` is "error"."""
    out = StreamScan(name, path)
    for where, row in read_rows(path):
        out.rows += 1
        try:
            if isinstance(row, _BadJson):
                raise DataError(row.message)
            out.domains[check_routed(parse_row(row, fmt, where, default_domain), routed).domain] += 1
        except DataError as exc:
            if on_bad_row == "error":
                raise DataError(f"{exc} (data stream {name!r}; data.on_bad_row: skip drops such rows)") from None
            out.bad_rows += 1
            if len(out.bad_examples) < MAX_EXAMPLES:
                out.bad_examples.append(str(exc))
    if out.usable == 0:
        raise DataError(
            f"{path}: data stream {name!r} has no usable rows ({out.rows} read, {out.bad_rows} bad"
            + (f"; first: {out.bad_examples[0]}" if out.bad_examples else "")
            + ")"
        )
    return out


def scan_data(spec: Any) -> list[StreamScan]:
    """Scan every `data.streams` file of `spec` (see the module docstring); logs one line per stream."""
    routed = routed_domains(spec)
    reports = []
    for i, s in enumerate(spec.data.streams):
        if not os.path.isfile(s.path):
            raise DataError(f"data.streams.{i}.path: {s.path} does not exist or is not a file")
        report = scan_stream(s.path, s.format, s.domain, routed, spec.data.on_bad_row, s.name)
        domains = ", ".join(f"{d}: {n}" for d, n in sorted(report.domains.items()))
        if report.bad_rows:
            log.warning(
                "data stream %s (%s): skipped %d bad rows of %d (data.on_bad_row: skip); first: %s",
                s.name,
                s.path,
                report.bad_rows,
                report.rows,
                report.bad_examples[0],
            )
        log.info("data stream %s: %d rows scanned, %d usable (%s)", s.name, report.rows, report.usable, domains)
        reports.append(report)
    return reports
