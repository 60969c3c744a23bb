"""SGLang `/generate` scoring protocol (sglang 0.5.x), both directions: request/response builders and checks.

A scoring request is a prefill-only generate call (`max_new_tokens: 0`) asking for input log-probs from
position `logprob_start_len` = the response's first position - 1: SGLang 0.5.23 reuses a cached prefix only up to
`logprob_start_len`, so the samples of one prompt share its prefix cache (a full-sequence score, from 0, would
recompute every prompt). The response's `meta_info.input_token_logprobs` has one `[logprob, token_id,
text_or_null]` entry per input token from that position on, the first without a log-prob (entry 0 of a request
from position 0 has no context; SGLang leaves the first entry empty from any position).

We always use OUR token ids, and only check that the echoed ones agree -- with one tolerated SGLang quirk: its
scheduler clips the echoed ids (`x if x < vocab_size - 1 else 0`, meant for multimodal hash ids), so an id >= the
model's vocab_size - 1 comes back as 0 (Llama-3: vocab_size is len(tokenizer), so its last token). Given the
model's `vocab_size`, exactly that is accepted, and that position's echoed text (token 0's) is reported as unknown;
nothing else is. A non-finite log-prob (NaN/inf) is a protocol error: the sample is retried on another replica and,
if it keeps failing, reported failed -- a silent NaN would poison the loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import TeacherError
from .base import TeacherScores


def build_request(
    ids: list[int] | list[list[int]], top_k: int | None, with_text: bool = False, first: int = 0
) -> dict[str, Any]:
    """The exact JSON body of a scoring request (`ids` may be a list of lists: a batched request) whose answer
    starts at position `first` (`logprob_start_len`; log-probs from position `first + 1` on)."""
    body: dict[str, Any] = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": int(first),
    }
    if top_k:
        body["top_logprobs_num"] = int(top_k)
    if with_text:
        body["return_text_in_logprobs"] = True
    return body


def _entry_lp_id(entry: Any, where: str) -> tuple[Any, Any, Any]:
    if not isinstance(entry, (list, tuple)) or len(entry) < 2:
        raise TeacherError(f"{where}: expected [logprob, token_id, text], got {entry!r:.80}")
    text = entry[2] if len(entry) > 2 else None
    return entry[0], entry[1], text


def sglang_clipped(sent: int, echoed: Any, vocab_size: int | None) -> bool:
    """True when `echoed` is SGLang's clip of `sent` (ids >= vocab_size - 1 come back as 0), not a mismatch."""
    return vocab_size is not None and echoed == 0 and sent != 0 and sent >= vocab_size - 1


def finite_logprob(value: Any, where: str) -> float:
    """`value` as a float log-prob; a TeacherError naming `where` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TeacherError(f"{where}: log-prob {value!r:.40} is not a number")
    if not math.isfinite(value):
        raise TeacherError(f"{where}: non-finite log-prob {value!r}")
    return float(value)


def parse_meta(
    obj: Any, ids: list[int], top_k: int | None, where: str, vocab_size: int | None = None, first: int = 0
) -> tuple[list[float], list[str | None], list[list[tuple[float, int]]] | None]:
    """Check one response object to a request from position `first` against `ids`; return the log-probs of
    positions first+1.., the per-token texts of positions first.. and the top-k lists `[(logprob, id), ...]` of
    positions first+1.. (None when not asked). `vocab_size`: the served model's vocabulary (config.json), for
    SGLang's clip of the echoed ids (see the module docstring). Entry j of the answer is position first + j."""
    if not isinstance(obj, dict) or not isinstance(obj.get("meta_info"), dict):
        raise TeacherError(f"{where}: response has no meta_info object: {str(obj)[:200]}")
    meta = obj["meta_info"]
    entries = meta.get("input_token_logprobs")
    n = len(ids) - first
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise TeacherError(
            f"{where}: input_token_logprobs has {got} entries, expected {n} (len(ids) - logprob_start_len)"
        )
    texts: list[str | None] = []
    if entries and entries[0] is not None:
        lp0, id0, text0 = _entry_lp_id(entries[0], f"{where}: entry 0")
        if lp0 is not None:
            raise TeacherError(f"{where}: entry 0 must carry no log-prob (the first returned position), got {lp0!r}")
        clipped = sglang_clipped(ids[first], id0, vocab_size)
        if id0 is not None and id0 != ids[first] and not clipped:
            raise TeacherError(f"{where}: entry 0 echoes token id {id0}, we sent {ids[first]}")
        texts.append(None if clipped else text0)
    elif entries:
        texts.append(None)
    logprobs: list[float] = []
    for j in range(1, n):
        lp, tid, text = _entry_lp_id(entries[j], f"{where}: entry {j}")
        sent = ids[first + j]
        clipped = sglang_clipped(sent, tid, vocab_size)
        if tid != sent and not clipped:
            raise TeacherError(f"{where}: entry {j} echoes token id {tid!r}, we sent {sent}")
        logprobs.append(finite_logprob(lp, f"{where}: entry {j}"))
        texts.append(None if clipped else text)
    tops = None
    if top_k:
        tops = _parse_top(meta.get("input_top_logprobs"), n, top_k, where)
    return logprobs, texts, tops


def _parse_top(raw: Any, n: int, top_k: int, where: str) -> list[list[tuple[float, int]]]:
    if not isinstance(raw, list) or len(raw) != n:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise TeacherError(f"{where}: input_top_logprobs has {got} entries, expected {n} (top_logprobs_num={top_k})")
    tops: list[list[tuple[float, int]]] = []
    for i in range(1, n):
        row = raw[i]
        if not isinstance(row, list) or len(row) != top_k:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise TeacherError(f"{where}: input_top_logprobs[{i}] has {got} entries, expected {top_k}")
        parsed = []
        for e in row:
            lp, tid, _ = _entry_lp_id(e, f"{where}: input_top_logprobs[{i}]")
            if isinstance(tid, bool) or not isinstance(tid, int):
                raise TeacherError(f"{where}: input_top_logprobs[{i}] has token id {tid!r}")
            parsed.append((finite_logprob(lp, f"{where}: input_top_logprobs[{i}]"), tid))
        tops.append(parsed)
    return tops


def parse_scores(
    obj: Any,
    ids: list[int],
    start: int,
    top_k: int | None,
    where: str,
    vocab_size: int | None = None,
    first: int = 0,
) -> TeacherScores:
    """Checked `TeacherScores` of the response part `ids[start:]` from one response object to a request from
    position `first` (<= start - 1; `score_request` asks from start - 1)."""
    logprobs, _texts, tops = parse_meta(obj, ids, top_k, where, vocab_size, first)
    part = TeacherScores(logprobs=torch.tensor(logprobs, dtype=torch.float32).reshape(-1))
    if tops is not None:
        k = int(top_k or 0)
        part.topk_ids = torch.tensor([[t for _, t in row] for row in tops], dtype=torch.long).reshape(-1, k)
        part.topk_logprobs = torch.tensor([[lp for lp, _ in row] for row in tops], dtype=torch.float32).reshape(-1, k)
    return part.sliced(start - 1 - first)


def score_request(ids: list[int], start: int, top_k: int | None) -> dict[str, Any]:
    """The scoring request of the response `ids[start:]`: log-probs from position `start` on, so the prompt
    `ids[:start]` is served from the prefix cache when another sample of the same prompt came first."""
    return build_request(list(ids), top_k, first=start - 1)


def build_response(
    ids: list[int], scores: TeacherScores, texts: list[str | None] | None, top_k: int | None, rid: str
) -> dict[str, Any]:
    """One SGLang-shaped response object for `ids`, from full-sequence scores (positions 1..len(ids)-1)."""
    texts = texts if texts is not None else [None] * len(ids)
    lps = scores.logprobs.tolist()
    token_lps: list[Any] = [[None, ids[0], texts[0]]] if ids else []
    token_lps += [[lps[i - 1], ids[i], texts[i]] for i in range(1, len(ids))]
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "cached_tokens": 0,
        "input_token_logprobs": token_lps,
        "output_token_logprobs": [],
    }
    if top_k:
        top_rows: list[Any] = [None]
        if scores.topk_ids is not None and scores.topk_logprobs is not None:
            tid, tlp = scores.topk_ids.tolist(), scores.topk_logprobs.tolist()
            top_rows += [[[lp, t, None] for lp, t in zip(tlp[j], tid[j])] for j in range(len(tid))]
        meta["input_top_logprobs"] = top_rows
        meta["output_top_logprobs"] = []
    return {"text": "", "meta_info": meta}
