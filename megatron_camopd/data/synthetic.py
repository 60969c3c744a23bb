"""Synthetic tasks with checkable answers for the tiny end-to-end demo (prompts stay well under 64 tokens).

Tasks (``TASKS``): ``arithmetic`` (a+b / a-b, small ints), ``reverse`` (reverse a string), ``sort`` (sort digits
or letters), ``copy`` (repeat a string), ``count`` (count a letter), ``cipher`` (the "domain" task: shift every
letter by one, a->b, z->a) and ``mc`` (multiple-choice arithmetic, answer is a letter). ``length_range`` is the
number of digits per operand for ``arithmetic``/``mc`` and the string length for the others.

``make_examples`` returns dicts with ``messages`` (one user turn), ``answer`` and metadata; ``write_jsonl`` /
``write_parquet`` write them in any format ``PromptStream`` reads (``messages``, ``prompt``, ``nemotron``, ``coser``,
``medical_mc``). ``score_exact``/``accuracy`` are the exact-match scorers of the demo.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_camopd.data.verifiers import normalize_whitespace
from megatron_camopd.errors import DataError

TASKS: tuple[str, ...] = ("arithmetic", "reverse", "sort", "copy", "count", "cipher", "mc")
DEFAULT_DOMAIN: dict[str, str] = {
    "arithmetic": "general",
    "reverse": "general",
    "sort": "general",
    "copy": "general",
    "count": "general",
    "cipher": "domain",
    "mc": "general",
}
DEFAULT_LENGTH: dict[str, tuple[int, int]] = {
    "arithmetic": (1, 2),
    "mc": (1, 2),
    "reverse": (3, 8),
    "sort": (3, 8),
    "copy": (3, 8),
    "count": (4, 10),
    "cipher": (3, 8),
}
WRITE_FORMATS: tuple[str, ...] = ("messages", "prompt", "nemotron", "coser", "medical_mc")


def shift_letters(text: str, k: int = 1) -> str:
    """Caesar-shift lowercase letters by ``k`` (other characters unchanged)."""
    a = ord("a")
    return "".join(chr((ord(c) - a + k) % 26 + a) if "a" <= c <= "z" else c for c in text)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(0, 10**digits)


def _word(rng: random.Random, n: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _one(task: str, rng: random.Random, lo: int, hi: int) -> dict[str, Any]:
    n = rng.randint(lo, hi)
    extra: dict[str, Any] = {}
    if task == "arithmetic":
        a, b = _number(rng, n), _number(rng, rng.randint(lo, hi))
        op = rng.choice("+-")
        prompt, answer = f"{a}{op}{b}=", str(a + b if op == "+" else a - b)
    elif task == "reverse":
        s = _word(rng, n)
        prompt, answer = f"reverse: {s}", s[::-1]
    elif task == "sort":
        s = _word(rng, n, rng.choice([string.digits, string.ascii_lowercase]))
        prompt, answer = f"sort: {s}", "".join(sorted(s))
    elif task == "copy":
        s = _word(rng, n, string.ascii_lowercase + string.digits)
        prompt, answer = f"copy: {s}", s
    elif task == "count":
        s = _word(rng, n, "abc")
        c = rng.choice("abc")
        prompt, answer = f"count {c}: {s}", str(s.count(c))
    elif task == "cipher":
        s = _word(rng, n)
        prompt, answer = f"shift: {s}", shift_letters(s)
    elif task == "mc":
        a, b = _number(rng, n), _number(rng, rng.randint(lo, hi))
        value = a + b
        wrong = sorted({value + d for d in (-2, -1, 1, 2, 3, 10)} - {value})
        opts = rng.sample(wrong, 3) + [value]
        rng.shuffle(opts)
        letter = "ABCD"[opts.index(value)]
        options = {L: str(v) for L, v in zip("ABCD", opts)}
        body = " ".join(f"{L}) {v}" for L, v in options.items())
        prompt, answer = f"{a}+{b}? {body}", letter
        extra = {"question": f"What is {a}+{b}?", "options": options}
    else:
        raise DataError(f"unknown synthetic task {task!r} (known: {', '.join(TASKS)})")
    return {"prompt": prompt, "answer": answer, **extra}


def make_examples(
    task: str,
    n: int,
    seed: int = 0,
    length_range: tuple[int, int] | None = None,
    domain: str | None = None,
) -> list[dict[str, Any]]:
    """``n`` seeded examples of ``task``: dicts with uid, task, domain, messages (user turn), prompt, answer."""
    if task not in TASKS:
        raise DataError(f"unknown synthetic task {task!r} (known: {', '.join(TASKS)})")
    lo, hi = length_range or DEFAULT_LENGTH[task]
    if not 1 <= lo <= hi:
        raise DataError(f"synthetic task {task}: length_range must satisfy 1 <= lo <= hi, got {(lo, hi)}")
    rng = random.Random(f"{task}:{seed}")
    out = []
    for i in range(n):
        ex = _one(task, rng, lo, hi)
        ex.update(
            uid=f"{task}-{seed}-{i}",
            task=task,
            domain=domain or DEFAULT_DOMAIN[task],
            messages=[{"role": "user", "content": ex["prompt"]}],
        )
        out.append(ex)
    return out


def make_loud_examples(
    task: str,
    n: int,
    seed: int = 0,
    length_range: tuple[int, int] | None = None,
    marker: str = "!",
    domain: str = "domain",
) -> list[dict[str, Any]]:
    """The "loud" persona of a general task: the same prompt behind a marker (`"! reverse: abc"`), answered in
    capitals (`"CBA"`). It shares its surface form with the plain task, so a model specialised on it tends to
    shout at plain prompts too (forgetting), and recovering the plain behaviour pulls the shared parameters
    against preserving the persona (the counteraction the CaMOPD paper measures). Task name `loud_<task>`."""
    out = []
    for ex in make_examples(task, n, seed, length_range, domain):
        prompt = f"{marker} {ex['prompt']}"
        i = ex["uid"].rsplit("-", 1)[1]
        out.append(
            {
                **ex,
                "prompt": prompt,
                "answer": ex["answer"].upper(),
                "task": f"loud_{task}",
                "uid": f"loud_{task}-{seed}-{i}",
                "messages": [{"role": "user", "content": prompt}],
            }
        )
    return out


def to_row(ex: dict[str, Any], fmt: str) -> dict[str, Any]:
    """One example as a row of prompt format ``fmt``."""
    base = {"uid": ex["uid"], "domain": ex["domain"]}
    if fmt == "messages":
        return {**base, "messages": ex["messages"], "answer": ex["answer"]}
    if fmt == "prompt":
        return {**base, "prompt": ex["prompt"], "answer": ex["answer"]}
    if fmt == "nemotron":
        reply = {"role": "assistant", "content": ex["answer"]}
        return {**base, "category": ex["task"], "messages": [*ex["messages"], reply], "answer": ex["answer"]}
    if fmt == "coser":
        return {**base, "messages": [*ex["messages"], {"role": "assistant", "content": ex["answer"]}]}
    if fmt == "medical_mc":
        if "options" not in ex:
            raise DataError(f"format medical_mc needs a multiple-choice task ('mc'), got {ex['task']!r}")
        return {**base, "question": ex["question"], "options": ex["options"], "answer": ex["answer"]}
    raise DataError(f"unknown prompt format {fmt!r} (known: {', '.join(WRITE_FORMATS)})")


def write_jsonl(examples: Sequence[dict[str, Any]], path: str | Path, fmt: str = "messages") -> Path:
    """Write examples as JSONL rows of format ``fmt``; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [to_row(ex, fmt) for ex in examples]
    with p.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file written by `write_jsonl` (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def task_of(row: dict[str, Any]) -> str:
    """The task of a written row: its `task` field, else the prefix of its uid (`task-seed-i`)."""
    return row.get("task") or row["uid"].split("-")[0]


def write_parquet(examples: Sequence[dict[str, Any]], path: str | Path, fmt: str = "messages") -> Path:
    """Write examples as a Parquet table of format ``fmt``; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([to_row(ex, fmt) for ex in examples]), p)
    return p


def verifier_name(task: str, fmt: str = "messages") -> str:
    """The verifier that scores ``task`` rendered in ``fmt`` (``mc_letter`` for medical_mc, else exact match)."""
    return "mc_letter" if fmt == "medical_mc" else "exact_match"


def score_exact(response: str, answer: str) -> float:
    """1.0 when the response (whitespace-normalised, chat end tokens stripped) equals the answer."""
    for tok in ("<|im_end|>", "<|endoftext|>"):
        response = response.split(tok, 1)[0]
    return float(normalize_whitespace(response) == normalize_whitespace(answer))


def accuracy(responses: Sequence[str], answers: Sequence[str]) -> float:
    """Mean exact-match score over paired responses and answers."""
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(score_exact(r, a) for r, a in zip(responses, answers)) / len(answers)


def make_mixture(tasks: Sequence[str], n_per_task: int, seed: int = 0) -> list[dict[str, Any]]:
    """Examples of several tasks, shuffled together with a seeded generator."""
    out = [ex for t in tasks for ex in make_examples(t, n_per_task, seed)]
    random.Random(seed).shuffle(out)
    return out
