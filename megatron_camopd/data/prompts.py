"""Deterministic, resumable prompt streams read from JSONL, JSON or Parquet files.

A ``PromptStream`` loads its sources once (rows parsed by ``formats.parse_row``, rendered with the tokenizer's chat
template), then serves ``next_batch(n)`` from a per-epoch permutation drawn from a generator seeded with
``(seed, epoch)``. Its ``state_dict()`` (epoch, position, counters and a hash of the prompt set) restores exactly
the same future sequence after a resume, and refuses a state saved for a different prompt set.

Policies:
- Over-long prompts (``max_prompt_len``): ``overlong="truncate"`` LEFT-truncates, keeping the last
  ``max_prompt_len`` tokens. The end of the conversation (last user turn and the assistant generation header) is
  what the student must continue from, so it is kept; the system prompt/early turns are what is lost. Truncated
  prompts are counted (``counters["truncated"]``). ``overlong="skip"`` drops them (``counters["skipped_overlong"]``).
- Malformed rows: ``on_bad_row="error"`` (default) raises ``DataError`` naming ``file:line`` and the field;
  ``on_bad_row="skip"`` drops them and counts them (``counters["bad_rows"]``, first messages in ``bad_examples``).
  For Parquet files and JSON arrays the "line" is the 1-based row number. With ``routed_domains`` (the domains the
  spec routes to a teacher), a row whose domain is not among them is a malformed row too: it would otherwise fail
  only when first drawn, possibly hours into a run.

``PromptSource.num_samples`` keeps a seeded subset of a source's rows; for the ``nemotron`` format the subset is
stratified by ``category`` so that category proportions are preserved (largest-remainder allocation), as the
CaMOPD paper does for its 10K proxy general prompts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_camopd.data.formats import FORMATS, ParsedRow, parse_row
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.errors import DataError

OVERLONG_POLICIES = ("truncate", "skip")
BAD_ROW_POLICIES = ("error", "skip")


@dataclass
class Prompt:
    """One prompt ready for rollout."""

    uid: str
    domain: str
    prompt_ids: list[int]
    messages: list[dict[str, str]]
    reference: Any
    source: str  # "file:line"
    truncated: bool = False
    category: str | None = None


@dataclass
class PromptSource:
    """One dataset file of a stream."""

    path: str
    format: str = "messages"
    domain: str = "general"  # used when a row has no ``domain`` field
    num_samples: int | None = None  # keep a seeded (category-stratified for nemotron) subset of this size

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"prompt source {self.path}: unknown format {self.format!r} (known: {', '.join(FORMATS)})")
        if self.num_samples is not None and self.num_samples < 1:
            raise DataError(f"prompt source {self.path}: num_samples must be >= 1")


def _not_utf8(where: str, data: bytes, exc: UnicodeDecodeError) -> str:
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column})"


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every row of a ``.jsonl``/``.json``/``.parquet`` file (``where`` = ``file:line``).

    Files are streamed (a JSONL line or a Parquet batch at a time; a ``.json`` array is read whole). A JSONL line
    that is not UTF-8 or not JSON is yielded as a ``_BadJson`` row so that the caller's ``on_bad_row`` decides.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(p)
    elif suffix == ".json":
        data = p.read_bytes()
        try:
            rows = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            bad_line = data.count(b"\n", 0, exc.start) + 1
            raise DataError(_not_utf8(f"{p}:{bad_line}", data, exc)) from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{p}: invalid JSON (nested too deeply)") from None
        if not isinstance(rows, list):
            raise DataError(f"{p}: a .json prompt file must hold a list of rows")
        for i, row in enumerate(rows):
            yield f"{p}:{i + 1}", row
    elif suffix == ".jsonl":
        with p.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{p}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield where, _BadJson(_not_utf8(where, raw, exc))
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, _BadJson(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                    continue
                except RecursionError:
                    yield where, _BadJson(f"{where}: invalid JSON (nested too deeply)")
                    continue
                yield where, row
    else:
        raise DataError(f"prompt file {p}: unsupported extension {suffix!r} (use .jsonl, .json or .parquet)")


def _parquet_rows(p: Path, batch_size: int = 4096) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                i += 1
                yield f"{p}:{i}", row
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError/... on corrupt files
        raise DataError(f"{p}: cannot read Parquet ({exc})") from exc


@dataclass
class _BadJson:
    message: str


def check_routed(row: ParsedRow, routed: frozenset[str] | None) -> ParsedRow:
    """``row`` unchanged, or ``DataError`` when ``routed`` is given and does not hold the row's domain."""
    if routed is not None and row.domain not in routed:
        raise DataError(
            f"{row.source}: field 'domain': {row.domain!r} is not routed to a teacher "
            f"(routing has: {', '.join(sorted(routed)) or 'nothing'})"
        )
    return row


def proportional_allocation(counts: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over categories proportionally to ``counts`` (largest remainder; ties by category name)."""
    total = sum(counts.values())
    n = min(n, total)
    exact = {c: n * k / total for c, k in counts.items()}
    alloc = {c: int(v) for c, v in exact.items()}
    rest = n - sum(alloc.values())
    order = sorted(counts, key=lambda c: (-(exact[c] - alloc[c]), c))
    for c in order[:rest]:
        alloc[c] += 1
    return alloc


def _subsample(rows: list[ParsedRow], n: int, stratified: bool, rng: np.random.Generator) -> list[ParsedRow]:
    if n >= len(rows):
        return rows
    if not stratified:
        keep = sorted(rng.choice(len(rows), size=n, replace=False).tolist())
        return [rows[i] for i in keep]
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_cat.setdefault(r.category or "", []).append(i)
    alloc = proportional_allocation({c: len(ix) for c, ix in by_cat.items()}, n)
    keep_idx: list[int] = []
    for c in sorted(by_cat):
        ix = by_cat[c]
        keep_idx.extend(ix[j] for j in rng.choice(len(ix), size=alloc[c], replace=False).tolist())
    return [rows[i] for i in sorted(keep_idx)]


@dataclass
class _Counters:
    rows: int = 0
    bad_rows: int = 0
    truncated: int = 0
    skipped_overlong: int = 0
    prompts: int = 0
    bad_examples: list[str] = field(default_factory=list)


class PromptStream:
    """Endless, seeded, resumable stream of ``Prompt`` over one or more sources."""

    def __init__(
        self,
        sources: Sequence[PromptSource],
        tokenizer: Tokenizer,
        max_prompt_len: int | None = None,
        overlong: str = "truncate",
        on_bad_row: str = "error",
        seed: int = 0,
        shuffle: bool = True,
        name: str = "prompts",
        routed_domains: Collection[str] | None = None,
    ) -> None:
        if not sources:
            raise DataError(f"prompt stream {name!r}: no sources")
        if overlong not in OVERLONG_POLICIES:
            raise DataError(f"prompt stream {name!r}: overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if on_bad_row not in BAD_ROW_POLICIES:
            raise DataError(f"prompt stream {name!r}: on_bad_row must be one of {BAD_ROW_POLICIES}")
        if max_prompt_len is not None and max_prompt_len < 1:
            raise DataError(f"prompt stream {name!r}: max_prompt_len must be >= 1")
        self.name = name
        self.seed = int(seed)
        self.shuffle = shuffle
        self.routed_domains = None if routed_domains is None else frozenset(routed_domains)
        self._c = _Counters()
        self._prompts: list[Prompt] = []
        for i, src in enumerate(sources):
            rows = self._parse_source(src, on_bad_row)
            if src.num_samples is not None:
                rng = np.random.default_rng([self.seed, 7919, i])
                rows = _subsample(rows, src.num_samples, src.format == "nemotron", rng)
            for row in rows:
                self._add(row, tokenizer, max_prompt_len, overlong)
        if not self._prompts:
            raise DataError(f"prompt stream {name!r}: no usable prompts in {[s.path for s in sources]}")
        self._c.prompts = len(self._prompts)
        self._uid_hash = hashlib.sha256("\n".join(p.source for p in self._prompts).encode()).hexdigest()[:16]
        self.epoch = 0
        self.position = 0
        self.served = 0
        self._order = self._permutation(0)

    # --- loading ----------------------------------------------------------------------------------------------
    def _parse_source(self, src: PromptSource, on_bad_row: str) -> list[ParsedRow]:
        out: list[ParsedRow] = []
        for where, row in read_rows(src.path):
            self._c.rows += 1
            try:
                if isinstance(row, _BadJson):
                    raise DataError(row.message)
                out.append(check_routed(parse_row(row, src.format, where, src.domain), self.routed_domains))
            except DataError as exc:
                if on_bad_row == "error":
                    raise
                self._c.bad_rows += 1
                if len(self._c.bad_examples) < 5:
                    self._c.bad_examples.append(str(exc))
        return out

    def _add(self, row: ParsedRow, tok: Tokenizer, max_len: int | None, overlong: str) -> None:
        ids = tok.apply_chat_template(row.messages, add_generation_prompt=True)
        truncated = False
        if max_len is not None and len(ids) > max_len:
            if overlong == "skip":
                self._c.skipped_overlong += 1
                return
            ids = ids[-max_len:]
            truncated = True
            self._c.truncated += 1
        self._prompts.append(
            Prompt(row.uid, row.domain, ids, row.messages, row.reference, row.source, truncated, row.category)
        )

    # --- iteration --------------------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> list[int]:
        n = len(self._prompts)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts; crossing an epoch boundary reshuffles with the next epoch's generator."""
        if n < 0:
            raise ValueError("n must be >= 0")
        out: list[Prompt] = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), len(self._order) - self.position)
            out.extend(self._prompts[i] for i in self._order[self.position : self.position + take])
            self.position += take
        self.served += n
        return out

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def prompts(self) -> list[Prompt]:
        """All loaded prompts in file order (read-only use)."""
        return self._prompts

    @property
    def counters(self) -> dict[str, int]:
        """rows read, bad_rows, truncated, skipped_overlong, prompts (usable), served, epoch."""
        c = self._c
        return {
            "rows": c.rows,
            "bad_rows": c.bad_rows,
            "truncated": c.truncated,
            "skipped_overlong": c.skipped_overlong,
            "prompts": c.prompts,
            "served": self.served,
            "epoch": self.epoch,
        }

    @property
    def bad_examples(self) -> list[str]:
        """The first (up to 5) error messages of rows dropped by ``on_bad_row="skip"``."""
        return list(self._c.bad_examples)

    def domain_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self._prompts:
            counts[p.domain] = counts.get(p.domain, 0) + 1
        return counts

    # --- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "served": self.served,
            "num_prompts": len(self._prompts),
            "prompt_set_hash": self._uid_hash,
            "counters": self.counters,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; raises ``DataError`` if the state belongs to a different prompt set or seed."""
        for key, mine in (
            ("num_prompts", len(self._prompts)),
            ("prompt_set_hash", self._uid_hash),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"prompt stream {self.name!r}: checkpoint has {key}={state.get(key)!r}, "
                    f"this stream has {mine!r}; the data or seed changed since the checkpoint"
                )
        position = int(state["position"])
        if not 0 <= position <= len(self._prompts):
            raise DataError(f"prompt stream {self.name!r}: checkpoint position {position} out of range")
        self.epoch = int(state["epoch"])
        self.position = position
        self.served = int(state.get("served", 0))
        self._order = self._permutation(self.epoch)
