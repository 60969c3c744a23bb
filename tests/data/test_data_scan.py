"""The data scan (issue 16): every stream is checked row by row before any model loads, errors name file:line.

A bad byte or an unrouted domain used to surface as a traceback or hours into a run (when the row was first
drawn); now `camopd train` stops at start-up with exit 2 naming `file:line`, and `data.on_bad_row: skip` drops
such rows (the scan logs how many; the prompt stream drops the very same rows) and trains.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from megatron_camopd.data.prompts import PromptSource, PromptStream
from megatron_camopd.data.scan import scan_data, scan_stream
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.errors import DataError
from tests.helpers import TINY_SPEC, run_cli

ROUTED = frozenset({"general", "domain"})


def row(i: int, domain: str = "domain") -> dict[str, Any]:
    return {
        "uid": f"r{i}",
        "domain": domain,
        "messages": [{"role": "user", "content": f"shift: abc{i}"}],
        "answer": "bcd",
    }


def write_rows(path: Path, n: int = 8, bad_byte_line: int | None = None, unrouted_line: int | None = None) -> Path:
    """n JSONL rows; line `bad_byte_line` gets a 0xff byte (not UTF-8), line `unrouted_line` domain 'chemistry'."""
    lines = []
    for i in range(1, n + 1):
        text = json.dumps(row(i, "chemistry" if i == unrouted_line else "domain")).encode()
        lines.append(text.replace(b"shift", b"shi\xfft") if i == bad_byte_line else text)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_byte_is_a_file_line_error_not_a_traceback(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    path = write_rows(tmp_path / "d.jsonl", bad_byte_line=3)
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 text \(byte 0xff at column \d+\)"):
        scan_stream(str(path), "messages", "domain", ROUTED, "error", "domain")
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8"):  # the stream itself, as the trainer opens it
        PromptStream([PromptSource(str(path))], tiny_tok)


def test_unrouted_domain_is_named_with_its_line(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    path = write_rows(tmp_path / "d.jsonl", unrouted_line=5)
    with pytest.raises(DataError, match=rf"^{path}:5: field 'domain': 'chemistry' is not routed to a teacher"):
        scan_stream(str(path), "messages", "domain", ROUTED, "error", "domain")
    with pytest.raises(DataError, match=rf"^{path}:5: field 'domain'"):
        PromptStream([PromptSource(str(path))], tiny_tok, routed_domains=ROUTED)
    report = scan_stream(str(path), "messages", "domain", None, "error")  # sft: no teacher, no routing
    assert report.bad_rows == 0 and report.domains == {"domain": 7, "chemistry": 1}


def test_skip_counts_the_rows_the_stream_drops(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    path = write_rows(tmp_path / "d.jsonl", n=10, bad_byte_line=3, unrouted_line=5)
    with path.open("ab") as fh:
        fh.write(b"{not json\n" + json.dumps({"uid": "x", "domain": "domain"}).encode() + b"\n")  # lines 11, 12
    report = scan_stream(str(path), "messages", "domain", ROUTED, "skip", "domain")
    assert (report.rows, report.bad_rows, report.usable) == (12, 4, 8)
    assert [m.split(": ")[0] for m in report.bad_examples] == [f"{path}:{n}" for n in (3, 5, 11, 12)]
    stream = PromptStream([PromptSource(str(path))], tiny_tok, on_bad_row="skip", routed_domains=ROUTED)
    assert stream.counters["bad_rows"] == report.bad_rows and len(stream) == report.usable
    assert {p.domain for p in stream.prompts} == {"domain"}


def test_a_stream_with_no_usable_row_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", n=1, unrouted_line=1)
    with pytest.raises(DataError, match=rf"^{path}: data stream 'domain' has no usable rows \(1 read, 1 bad"):
        scan_stream(str(path), "messages", "domain", ROUTED, "skip", "domain")


def test_parquet_and_json_rows_are_numbered(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row(1), {"uid": "r2", "domain": "domain", "messages": []}, row(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.parquet'}:2: field 'messages': is empty"):
        scan_stream(str(tmp_path / "d.parquet"), "messages", "domain", ROUTED, "error")
    bad = json.dumps([row(1), row(2)], indent=1).encode().replace(b"abc2", b"abc\xc3\x28")
    (tmp_path / "d.json").write_bytes(bad)
    line = bad[: bad.index(b"\xc3\x28")].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.json'}:{line}: not UTF-8"):
        scan_stream(str(tmp_path / "d.json"), "messages", "domain", ROUTED, "error")


def test_scan_data_names_the_stream_field_of_a_missing_file(tmp_path: Path) -> None:
    from megatron_camopd.config import load_spec

    spec = load_spec(
        TINY_SPEC,
        [
            f"data.streams.0.path={write_rows(tmp_path / 'g.jsonl')}",
            f"data.streams.1.path={tmp_path / 'missing.jsonl'}",
            "routing.general=domain",
        ],
    )
    with pytest.raises(DataError, match=r"^data.streams.1.path: .*missing.jsonl does not exist"):
        scan_data(spec)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_camopd.demo.tiny import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


def _train(root: Path, ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
    from megatron_camopd.demo.tiny import tiny_spec_overrides

    args = [
        *tiny_spec_overrides(root),
        f"checkpoint.dir={ckpt}",
        "logging.progress=off",
        "logging.diagnostics=false",
        *extra,
    ]
    return run_cli("train", str(TINY_SPEC), *args, timeout=300)


def _with_bad_rows(root: Path, out: Path) -> Path:
    """The tiny domain stream with a 0xff byte on line 3 and domain 'chemistry' on line 5."""
    lines = (root / "data" / "domain.jsonl").read_bytes().splitlines()
    lines[2] = lines[2].replace(b"shift", b"shi\xfft")
    fifth = json.loads(lines[4])
    lines[4] = json.dumps({**fifth, "domain": "chemistry"}).encode()
    out.write_bytes(b"\n".join(lines) + b"\n")
    return out


@pytest.mark.timeout(600)
def test_train_stops_before_any_model_loads_then_skip_mode_trains(tiny_root: Path, tmp_path: Path) -> None:
    data = _with_bad_rows(tiny_root, tmp_path / "domain.jsonl")
    res = _train(tiny_root, tmp_path / "c1", f"data.streams.1.path={data}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{data}:3: not UTF-8 text" in res.stderr and "Traceback" not in res.stderr
    assert "teacher general ready" not in res.stderr and not (tmp_path / "c1").exists()

    # the unrouted domain on line 5 is named the same way (test_unrouted_domain_is_named_with_its_line)
    data = _with_bad_rows(tiny_root, data)
    res = _train(
        tiny_root,
        tmp_path / "c2",
        f"data.streams.1.path={data}",
        "data.on_bad_row=skip",
        "train.steps=1",
        "schedule.mode=mixed",
        "schedule.mix_ratio=[1, 1]",
        "rollout.max_new_tokens=8",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data stream domain" in res.stderr and "skipped 2 bad rows of 256" in res.stderr, res.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "c2" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == 1
