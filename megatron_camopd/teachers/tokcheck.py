"""Start-up check that a teacher shares the student's tokenizer (SGLang scores by token id): a mismatched tokenizer
makes every
token gap meaningless, silently. Two independent checks:

1. our fingerprint (`data.tokenizer.hf_fingerprint`: vocab, special tokens, chat template), when the server
   reports one (our CPU server does);
2. a probe that works against real SGLang too (which only reports `tokenizer_path`): send known ids with
   `return_text_in_logprobs: true` and compare the server's per-token texts with our `tokenizer.decode([id])`.
   SGLang echoes ids >= its model's vocab_size - 1 as 0 (see `protocol.py`): such a position is not compared
   (its text is token 0's), every other one is. The served model's vocab_size is the server's own report, else
   its `model_path`'s config.json when readable from here, else the student's (same tokenizer, same family).

A teacher that fails either check, or that cannot be verified at all, is refused with a `TeacherError`. The served
vocab_size found is reported (`TokenizerCheck.vocab_size`) and handed to a client with an `echo_vocab_size`
attribute, whose scoring checks then tolerate the same clip (`protocol.parse_scores(..., vocab_size)`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data.tokenizer import Tokenizer, hf_fingerprint
from ..errors import TeacherError

DEFAULT_PROBE_TEXTS = ("Hello, world! 123", "The quick brown fox jumps over the lazy dog.", "x = f(y) + 2 * z\n")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The project's tokenizer fingerprint (`data.tokenizer.hf_fingerprint`) of a HF tokenizer or our `Tokenizer`."""
    return tokenizer.fingerprint() if isinstance(tokenizer, Tokenizer) else hf_fingerprint(tokenizer)


@dataclass
class TokenizerInfo:
    """What the student knows about its own tokenizer, for comparison with a teacher's."""

    fingerprint: str | None = None
    tokenizer_path: str | None = None
    vocab_size: int | None = None  # number of token ids the student can emit
    decode_token: Callable[[int], str] | None = field(default=None, repr=False)
    model_vocab_size: int | None = None  # the student's config.json vocab_size (>= vocab_size)

    @classmethod
    def from_hf(cls, tokenizer: Any, path: str | None = None, model_vocab_size: int | None = None) -> TokenizerInfo:
        return cls(
            fingerprint=tokenizer_fingerprint(tokenizer),
            tokenizer_path=path,
            vocab_size=len(tokenizer),
            decode_token=lambda i: tokenizer.decode([i]),
            model_vocab_size=model_vocab_size,
        )


def served_vocab_size(info: dict[str, Any], fallback: int | None) -> int | None:
    """The served model's config vocab_size: reported by the server (ours), read from its `model_path`'s
    config.json (SGLang reports the path), else `fallback`."""
    if isinstance(info.get("vocab_size"), int) and not isinstance(info.get("vocab_size"), bool):
        return int(info["vocab_size"])
    path = info.get("model_path")
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "config.json")):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
                vocab = json.load(fh).get("vocab_size")
        except (OSError, ValueError):
            vocab = None
        if isinstance(vocab, int) and not isinstance(vocab, bool):
            return vocab
    return fallback


def default_probe_ids(
    tokenizer: Any, texts: tuple[str, ...] = DEFAULT_PROBE_TEXTS, n_spread: int = 64
) -> list[list[int]]:
    """Probe sequences: the encodings of a few known strings, plus ids spread over the whole vocabulary (they
    catch a teacher whose vocabulary is smaller or ordered differently)."""
    probes = [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    n = len(tokenizer)
    step = max(1, n // n_spread)
    probes.append(sorted({*range(0, n, step), n - 1}))
    return [p for p in probes if len(p) >= 2]


@dataclass
class TokenizerCheck:
    """What `check_tokenizer` verified, per replica URL (for logs)."""

    name: str
    fingerprint_matched: dict[str, bool] = field(default_factory=dict)
    tokens_compared: dict[str, int] = field(default_factory=dict)
    model_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    vocab_size: dict[str, int | None] = field(default_factory=dict)  # the served model's, per replica (echo clip)


def check_tokenizer(teacher: Any, student: TokenizerInfo, probe_ids: list[list[int]] | None = None) -> TokenizerCheck:
    """Refuse (`TeacherError`) a teacher whose tokenizer differs from the student's; check every live replica.

    `teacher` is an `HttpTeacher` (per-replica `model_info(url)` and `probe(ids, url)`), or any `Teacher`, for which
    only the reported fingerprint can be compared.
    """
    report = TokenizerCheck(name=teacher.name)
    urls = list(getattr(teacher, "live_urls", lambda: [None])())
    if not urls:
        raise TeacherError(f"teacher {teacher.name}: no live replica to check the tokenizer of")
    for url in urls:
        where = f"teacher {teacher.name}" + (f" at {url}" if url else "")
        info = teacher.model_info(url) if url else teacher.model_info()
        report.model_info[url or ""] = info
        verified = False
        theirs = info.get("tokenizer_fingerprint")
        if student.fingerprint and theirs:
            if theirs != student.fingerprint:
                raise TeacherError(
                    f"{where}: tokenizer differs from the student's (fingerprint {theirs} != {student.fingerprint};"
                    f" teacher tokenizer_path={info.get('tokenizer_path')!r}, student={student.tokenizer_path!r})"
                )
            verified = True
        report.fingerprint_matched[url or ""] = verified
        their_vocab = info.get("vocab_size")
        if student.vocab_size and isinstance(their_vocab, int) and their_vocab < student.vocab_size:
            raise TeacherError(
                f"{where}: teacher vocabulary ({their_vocab}) is smaller than the student's ({student.vocab_size})"
            )
        compared = 0
        if url and probe_ids and student.decode_token is not None:
            vocab = served_vocab_size(info, student.model_vocab_size or student.vocab_size)
            report.vocab_size[url] = vocab
            compared = _probe_texts(teacher, url, student, probe_ids, where, vocab)
        report.tokens_compared[url or ""] = compared
        if not verified and compared == 0:
            raise TeacherError(
                f"{where}: cannot verify its tokenizer (no fingerprint match and no per-token texts to compare;"
                f" tokenizer_path={info.get('tokenizer_path')!r}). Pass probe ids and a student decode function."
            )
    sizes = {v for v in report.vocab_size.values() if v is not None}
    if len(sizes) == 1 and hasattr(teacher, "echo_vocab_size"):  # its scoring checks tolerate the same echo clip
        teacher.echo_vocab_size = sizes.pop()
    return report


def check_context(teacher: Any, seq_length: int, field: str) -> None:
    """Refuse (`TeacherError`) a served teacher any of whose replicas would refuse a full-length sample: it
    scores prompt + response, up to `seq_length` tokens, and a server takes inputs up to its own limit
    (`teacher.max_input_tokens(url)`: SGLang 0.5.23 `context_length - 7`, vLLM `max_model_len - 1`). Without this a
    cluster drops every full-length rollout at scoring time, biasing training against long responses. `field` is
    the spec field that sets the servers' context length (named in the error)."""
    for url in teacher.live_urls():
        max_input = teacher.max_input_tokens(url)
        if max_input is not None and max_input < seq_length:
            flag, needed = teacher.context_needed(seq_length)
            raise TeacherError(
                f"teacher {teacher.name} at {url}: its longest accepted input is {max_input} tokens, but samples"
                f" have up to {seq_length} (the model's sequence length): serve it with {flag} >= {needed} ({field})"
            )


def _probe_texts(
    teacher: Any, url: str, student: TokenizerInfo, probe_ids: list[list[int]], where: str, vocab_size: int | None
) -> int:
    assert student.decode_token is not None
    compared = 0
    for ids in probe_ids:
        try:
            texts = teacher.probe(ids, url, vocab_size=vocab_size)
        except TeacherError as exc:
            raise TeacherError(f"{where}: tokenizer probe with {len(ids)} ids failed: {exc}") from exc
        for i, (tid, text) in enumerate(zip(ids, texts)):
            if text is None:
                continue
            ours = student.decode_token(tid)
            if text != ours:
                raise TeacherError(
                    f"{where}: tokenizer differs from the student's: token id {tid} (probe position {i}) is"
                    f" {text!r} for the teacher but {ours!r} for the student"
                )
            compared += 1
    return compared
