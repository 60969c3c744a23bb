"""Evaluation tasks: seeded synthetic tasks of `data/synthetic.py`, or a JSON/JSONL/Parquet file with answers.

A task is a name, its examples (``messages`` + ``answer``, rendered exactly as training prompts are, via
``data.formats.parse_row``) and the name of the verifier that scores a response. Synthetic tasks are generated
with a fixed seed (default 1234, distinct from the demo's training seed 0) so numbers are comparable between
runs; ``--format medical_mc`` renders the synthetic ``mc`` task as a MedQA-style question scored by
``Final answer: <letter>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_camopd.data.formats import FORMATS, parse_row
from megatron_camopd.data.prompts import _BadJson, read_rows
from megatron_camopd.data.synthetic import TASKS, make_examples, to_row, verifier_name
from megatron_camopd.data.verifiers import get_verifier
from megatron_camopd.errors import DataError, SpecError

DEFAULT_SEED = 1234
DEFAULT_LIMIT = 64


@dataclass
class EvalTask:
    """One named evaluation set."""

    name: str
    examples: list[dict[str, Any]]
    verifier: str
    source: str  # "synthetic(seed=..)" or the data file


def default_verifier(fmt: str, task: str | None = None) -> str:
    """mc_letter for multiple-choice rows, else exact match (the synthetic tasks' scorer)."""
    if task in TASKS:
        return verifier_name(task, fmt)
    return "mc_letter" if fmt == "medical_mc" else "exact_match"


def _example(parsed: Any) -> dict[str, Any]:
    return {"uid": parsed.uid, "domain": parsed.domain, "messages": parsed.messages, "answer": parsed.reference}


def load_file_examples(path: str | Path, fmt: str = "messages", limit: int | None = None) -> list[dict[str, Any]]:
    """Examples from a prompt file; every row needs an answer (``DataError`` naming file:line otherwise)."""
    if fmt not in FORMATS:
        raise SpecError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    out = []
    for where, row in read_rows(path):
        if isinstance(row, _BadJson):
            raise DataError(row.message)
        parsed = parse_row(row, fmt, where, default_domain="eval")
        if parsed.reference is None or (isinstance(parsed.reference, str) and not parsed.reference.strip()):
            raise DataError(f"{where}: field 'answer': missing; evaluation needs a reference answer per row")
        out.append(_example(parsed))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no rows to evaluate")
    return out


def synthetic_examples(task: str, n: int, seed: int = DEFAULT_SEED, fmt: str = "messages") -> list[dict[str, Any]]:
    """``n`` seeded examples of a synthetic task, rendered in prompt format ``fmt``."""
    out = []
    for ex in make_examples(task, n, seed):
        row = to_row(ex, fmt)
        out.append({**_example(parse_row(row, fmt, f"synthetic:{ex['uid']}", ex["domain"])), "task": task})
    return out


def load_tasks(
    names: Sequence[str],
    data: str | None = None,
    fmt: str = "messages",
    verifier: str | None = None,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[EvalTask]:
    """Build the tasks of ``camopd eval --task A,B``: synthetic by name, or one named task read from ``data``."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise SpecError("--task: give at least one task name")
    if verifier is not None:
        get_verifier(verifier)  # SpecError for an unknown name
    if data is not None:
        if len(names) != 1:
            raise SpecError(f"--data: one data file is one task; got --task {','.join(names)}")
        examples = load_file_examples(data, fmt, limit)
        return [EvalTask(names[0], examples, verifier or default_verifier(fmt, None), str(data))]
    tasks = []
    for name in names:
        if name not in TASKS:
            raise SpecError(
                f"--task: '{name}' is not a synthetic task ({', '.join(TASKS)}); give --data FILE for a dataset"
            )
        examples = synthetic_examples(name, limit or DEFAULT_LIMIT, seed, fmt)
        tasks.append(
            EvalTask(name, examples, verifier or default_verifier(fmt, name), f"synthetic(seed={seed}, format={fmt})")
        )
    return tasks
