"""Outcome verifiers: score a response against a reference with 0 or 1 (Uni-OPD outcome rewards, evaluation).

- ``exact_match``: equal after whitespace normalisation (strip, collapse runs of whitespace).
- ``numeric``: the LAST number in the response equals the reference within ``atol + rtol * |ref|``.
- ``mc_letter``: the letter of the LAST ``Final answer: <letter>`` (case-insensitive) equals the reference letter.
- ``code``: runs the response's program (last fenced code block, else the whole text) against test cases inside
  a bubblewrap sandbox (``megatron_camopd.data.sandbox``: no network, no host files, unprivileged, rlimits). When
  no sandbox can be made here it raises ``SandboxUnavailable`` (a ``CamopdError``) instead of scoring 0.

``get_verifier(name)`` returns a callable ``(response, reference) -> float``; for ``code`` it first checks that
the sandbox works, so a trainer or evaluation fails with a clear message at its first lookup.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from collections.abc import Callable
from typing import Any

from megatron_camopd.data.sandbox import SandboxLimits, SandboxResult, ensure_available, run_python
from megatron_camopd.errors import DataError, SpecError

Verifier = Callable[[str, Any], float]

_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_FINAL_LETTER = re.compile(r"final\s*answer\s*(?:is)?\s*[:：]?\s*\**\s*[\(\[]?\s*([A-Za-z])\b", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def normalize_whitespace(text: str) -> str:
    return _WS.sub(" ", text).strip()


def exact_match(response: str, reference: Any) -> float:
    """1.0 when response and reference are equal after whitespace normalisation."""
    if reference is None:
        return 0.0
    return float(normalize_whitespace(response) == normalize_whitespace(str(reference)))


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(response: str, reference: Any, atol: float = 1e-6, rtol: float = 1e-4) -> float:
    """1.0 when the last number of the response equals the (numeric) reference within tolerance."""
    if isinstance(reference, bool) or reference is None:
        return 0.0
    ref = float(reference) if isinstance(reference, (int, float)) else last_number(str(reference))
    got = last_number(response)
    if ref is None or got is None or not math.isfinite(got) or not math.isfinite(ref):
        return 0.0
    return float(abs(got - ref) <= atol + rtol * abs(ref))


def final_letter(text: str) -> str | None:
    """The upper-case letter of the last ``Final answer: <letter>`` in ``text``, or None."""
    matches = _FINAL_LETTER.findall(text)
    return matches[-1].upper() if matches else None


def mc_letter(response: str, reference: Any) -> float:
    """1.0 when the last ``Final answer: <letter>`` matches the reference letter (case-insensitive)."""
    if not isinstance(reference, str) or not reference.strip():
        return 0.0
    got = final_letter(response)
    return float(got is not None and got == reference.strip().upper())


def extract_code(response: str) -> str:
    """The last fenced code block of a response, or the whole response when it has none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_code_tests(reference: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """Normalise a code reference to (stdin/stdout pairs, assert statements).

    Accepted: a dict (or its JSON text) with ``tests: [{"stdin"|"input": .., "stdout"|"output": ..}]`` and/or
    ``asserts: [str, ...]``; or a plain string of assert statements.
    """
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except json.JSONDecodeError:
            return [], [reference]
    if not isinstance(reference, dict):
        raise DataError(f"code verifier: reference must be a dict or a string, got {type(reference).__name__}")
    io: list[tuple[str, str]] = []
    for i, case in enumerate(reference.get("tests", [])):
        if not isinstance(case, dict):
            raise DataError(f"code verifier: tests[{i}] must be an object")
        stdin = case.get("stdin", case.get("input", ""))
        stdout = case.get("stdout", case.get("output"))
        if not isinstance(stdin, str) or not isinstance(stdout, str):
            raise DataError(f"code verifier: tests[{i}] needs string 'stdin' and 'stdout'")
        io.append((stdin, stdout))
    asserts = reference.get("asserts", [])
    if isinstance(asserts, str):
        asserts = [asserts]
    if not isinstance(asserts, list) or not all(isinstance(a, str) for a in asserts):
        raise DataError("code verifier: 'asserts' must be a list of strings")
    if not io and not asserts:
        raise DataError("code verifier: reference has no tests and no asserts")
    return io, list(asserts)


def _outputs_match(got: str, want: str) -> bool:
    """Compare program output line by line, ignoring trailing whitespace and trailing blank lines."""
    g = [ln.rstrip() for ln in got.rstrip().splitlines()]
    w = [ln.rstrip() for ln in want.rstrip().splitlines()]
    return g == w


def code(response: str, reference: Any, limits: SandboxLimits | None = None) -> float:
    """1.0 when the program passes every stdin/stdout case and every assert inside the sandbox.

    Raises ``SandboxUnavailable`` (never returns 0.0 for every sample) when bubblewrap is missing or unusable."""
    io, asserts = parse_code_tests(reference)
    program = extract_code(response)
    lim = limits or SandboxLimits()
    for stdin, want in io:
        res = run_python(program, stdin=stdin, limits=lim)
        if not res.ok or not _outputs_match(res.stdout, want):
            return 0.0
    if asserts and not run_to_the_end(program + "\n\n" + "\n".join(asserts), lim).ok:
        return 0.0
    return 1.0


def run_to_the_end(program: str, limits: SandboxLimits) -> SandboxResult:
    """Run `program` in the sandbox; `ok` only if it ran to its last line. A program that exits early with
    status 0 (sys.exit(0), os._exit(0), raise SystemExit) before its checks never prints the per-run token
    appended after them, and fails."""
    token = secrets.token_hex(16)
    res = run_python(program + f"\nprint({token!r})\n", limits=limits)
    if res.ok and res.stdout.rstrip().splitlines()[-1:] != [token]:
        return dataclasses.replace(res, returncode=1, stderr=res.stderr + "\nexited before its last line")
    return res


_REGISTRY: dict[str, Verifier] = {
    "exact_match": exact_match,
    "numeric": numeric,
    "mc_letter": mc_letter,
    "code": code,
}


# the names a spec's `data.streams[].verifier` uses -> registry names
VERIFIER_NAMES = {"exact": "exact_match", "numeric": "numeric", "multiple_choice": "mc_letter", "code": "code"}


def get_verifier(name: str) -> Verifier:
    """The verifier registered as ``name`` (exact_match, numeric, mc_letter, code)."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown verifier {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None
    if fn is code:
        ensure_available()  # SandboxUnavailable now rather than at the first scored response
    return fn


def register_verifier(name: str, fn: Verifier) -> None:
    """Register a custom verifier (e.g. a synthetic task's scorer)."""
    if name in _REGISTRY:
        raise SpecError(f"verifier {name!r} is already registered")
    _REGISTRY[name] = fn


def verifier_names() -> list[str]:
    return sorted(_REGISTRY)
