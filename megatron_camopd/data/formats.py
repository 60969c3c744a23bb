"""Row formats of prompt datasets: turn one JSONL/Parquet row into chat messages, a reference and a domain.

Formats (``PromptSource.format``):
- ``messages``: OpenAI-style ``messages`` (``role``/``content``); the prompt is the conversation up to and
  including the last ``user`` turn (trailing assistant turns are dropped). Reference: ``answer``/``reference``.
- ``prompt``: a ``prompt`` string (optional ``system`` string) rendered as one user turn.
- ``nemotron``: ``category`` + ``messages`` (Nemotron-Post-Training style); prompt as in ``messages``, the
  assistant reference response is dropped; the stream samples categories proportionally.
- ``coser``: multi-turn role-play (``messages`` or ShareGPT ``conversations`` with ``from``/``value``); the first
  n-1 turns are the prompt, the last turn is kept as reference (never shown to the model).
- ``medical_mc``: ``question`` + options (``options`` dict/list or ``opa``..``ope``) rendered with the medical
  multiple-choice template asking for ``Final answer: <letter>``; the answer letter (``answer``/``answer_idx``
  letter or MedMCQA's 0-based ``cop``) is the reference. Without options the open-ended variant is used.

Every malformed row raises ``DataError`` naming ``file:line`` and the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_camopd.errors import DataError

FORMATS: tuple[str, ...] = ("messages", "prompt", "nemotron", "coser", "medical_mc")
ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
LETTERS = "ABCDEFGHIJ"

MEDICAL_SYSTEM = (
    "You are a careful medical reasoning assistant. Provide educational medical information, mention uncertainty "
    "when relevant, and recommend professional medical care for diagnosis or treatment decisions."
)
MEDICAL_MC_SUFFIX = (
    "Please reason step by step and give the final answer choice at the end, as a line of the form "
    '"Final answer: <letter>".'
)
MEDICAL_OPEN_SUFFIX = (
    "Please reason step by step and answer clearly. Do not present the answer as a substitute for professional "
    "medical advice."
)


@dataclass
class ParsedRow:
    """A row reduced to what the stream needs (tokenisation happens later)."""

    messages: list[dict[str, str]]
    reference: Any
    domain: str
    uid: str
    source: str  # "file:line"
    category: str | None = None


def bad(where: str, field: str, why: str) -> DataError:
    """A ``DataError`` whose message names the location and the field."""
    return DataError(f"{where}: field '{field}': {why}")


def parse_row(row: Any, fmt: str, where: str, default_domain: str) -> ParsedRow:
    """Parse one decoded row of format ``fmt``; ``where`` is ``file:line`` for error messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row must be a JSON object, got {type(row).__name__}")
    if fmt in ("messages", "nemotron"):
        msgs = _prompt_up_to_last_user(_messages(row, "messages", where), where)
    elif fmt == "prompt":
        msgs = _prompt_field(row, where)
    elif fmt == "coser":
        key = "messages" if "messages" in row else "conversations"
        turns = _messages(row, key, where)
        if len(turns) < 2:
            raise bad(where, key, f"coser rows need at least 2 turns, got {len(turns)}")
        msgs = turns[:-1]
        if all(m["role"] == "system" for m in msgs):
            raise bad(where, key, "the first n-1 turns contain no dialogue turn")
    elif fmt == "medical_mc":
        msgs, ref = _medical(row, where)
    else:
        raise DataError(f"{where}: unknown prompt format {fmt!r} (known: {', '.join(FORMATS)})")

    if fmt == "medical_mc":
        reference = ref
    elif fmt == "coser":
        reference = row.get("reference", turns[-1]["content"])
    else:
        reference = row.get("answer", row.get("reference"))
    category = None
    if fmt == "nemotron":
        category = row.get("category")
        if not isinstance(category, str) or not category:
            raise bad(where, "category", "missing or not a non-empty string")
    return ParsedRow(msgs, reference, _domain(row, where, default_domain), _uid(row, where), where, category)


def _domain(row: dict[str, Any], where: str, default: str) -> str:
    dom = row.get("domain", default)
    if not isinstance(dom, str) or not dom:
        raise bad(where, "domain", "must be a non-empty string")
    return dom


def _uid(row: dict[str, Any], where: str) -> str:
    for key in ("uid", "id"):
        if key in row and row[key] is not None:
            if not isinstance(row[key], (str, int)) or isinstance(row[key], bool):
                raise bad(where, key, "must be a string or an integer")
            return str(row[key])
    return where


def _messages(row: dict[str, Any], key: str, where: str) -> list[dict[str, str]]:
    """Validate a list of chat turns (OpenAI ``role``/``content`` or ShareGPT ``from``/``value``)."""
    if key not in row:
        raise bad(where, key, "missing")
    raw = row[key]
    if not isinstance(raw, list):
        raise bad(where, key, f"must be a list of turns, got {type(raw).__name__}")
    if not raw:
        raise bad(where, key, "is empty")
    out: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f, f"must be an object, got {type(m).__name__}")
        if "role" in m:
            role = m["role"]
            if role not in ROLES:
                raise bad(where, f"{f}.role", f"unknown role {role!r} (allowed: {', '.join(sorted(ROLES))})")
            content = m.get("content")
            cfield = f"{f}.content"
        elif "from" in m:
            if m["from"] not in SHAREGPT_ROLES:
                raise bad(where, f"{f}.from", f"unknown speaker {m['from']!r}")
            role = SHAREGPT_ROLES[m["from"]]
            content = m.get("value")
            cfield = f"{f}.value"
        else:
            raise bad(where, f"{f}.role", "missing")
        if not isinstance(content, str):
            raise bad(where, cfield, f"must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _prompt_up_to_last_user(msgs: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise bad(where, "messages", "has no user turn")
    return msgs[: last_user + 1]


def _prompt_field(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "prompt" not in row:
        raise bad(where, "prompt", "missing")
    text = row["prompt"]
    if not isinstance(text, str) or not text.strip():
        raise bad(where, "prompt", "must be a non-empty string")
    msgs: list[dict[str, str]] = []
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise bad(where, "system", "must be a string")
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": text})
    return msgs


def _medical(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], Any]:
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise bad(where, "question", "missing or not a non-empty string")
    options = _options(row, where)
    system = {"role": "system", "content": MEDICAL_SYSTEM}
    if not options:
        return [system, {"role": "user", "content": f"{q}\n{MEDICAL_OPEN_SUFFIX}"}], row.get("answer")
    body = "\n".join(f"{letter}. {text}" for letter, text in options)
    user = {"role": "user", "content": f"{q}\n{body}\n{MEDICAL_MC_SUFFIX}"}
    return [system, user], _answer_letter(row, where, [letter for letter, _ in options])


def _options(row: dict[str, Any], where: str) -> list[tuple[str, str]]:
    if "options" in row and row["options"] is not None:
        opts = row["options"]
        if isinstance(opts, dict):
            items = [(str(k).strip().upper(), v) for k, v in opts.items()]
        elif isinstance(opts, list):
            if len(opts) > len(LETTERS):
                raise bad(where, "options", f"at most {len(LETTERS)} options are supported")
            items = list(zip(LETTERS, opts))
        else:
            raise bad(where, "options", f"must be an object or a list, got {type(opts).__name__}")
        for k, v in items:
            if len(k) != 1 or k not in LETTERS or not isinstance(v, str):
                raise bad(where, "options", f"option {k!r} must be a letter A-J mapping to a string")
        if len({k for k, _ in items}) != len(items):
            raise bad(where, "options", "duplicate option letters")
        return sorted(items)
    items = []
    for letter, key in zip("ABCDE", ("opa", "opb", "opc", "opd", "ope")):
        if key in row and row[key] is not None:
            if not isinstance(row[key], str):
                raise bad(where, key, "must be a string")
            items.append((letter, row[key]))
    return items


def _answer_letter(row: dict[str, Any], where: str, letters: list[str]) -> str | None:
    """The gold letter from ``answer``/``answer_idx`` (letter) or ``cop`` (0-based index); None if absent."""
    for key in ("answer_idx", "answer"):
        v = row.get(key)
        if isinstance(v, str) and v.strip().upper() in letters:
            return v.strip().upper()
    cop = row.get("cop")
    if cop is not None:
        if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop < len(letters):
            raise bad(where, "cop", f"must be an integer in [0, {len(letters) - 1}]")
        return letters[cop]
    if row.get("answer") is not None or row.get("answer_idx") is not None:
        raise bad(where, "answer", f"must be one of the option letters {''.join(letters)}")
    return None
