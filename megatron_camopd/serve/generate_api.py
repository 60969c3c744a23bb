"""SGLang's `/generate` request schema, server side: parse and check a body into work items; build the answers.

Covers what `python/sglang/srt/managers/io_struct.py` (`GenerateReqInput`) and `sampling/sampling_params.py`
accept: `text` or `input_ids` (a single prompt or a batch), `sampling_params` (one object or one per item),
`return_logprob`, `logprob_start_len` (-1 = only the last prompt token), `top_logprobs_num`,
`return_text_in_logprobs`, and inert bookkeeping fields (`rid`, `log_metrics`, ...). Limits are SGLang 0.5.23's:
an input must be shorter than the context length, hold at most `max_input_tokens(context)` tokens (its
scheduler's `max_req_input_len`), and prompt + max_new_tokens may not exceed the context length. A field SGLang
knows but this server does not implement (multimodal inputs, LoRA, grammars, penalties, streaming, n > 1 ...) is
refused unless it holds its default; an unknown field is refused. Every refusal is an `ApiError` naming the
field (the server answers 400 with it). `load_json` decodes a body defensively: strict JSON (no NaN/Infinity),
nested at most `MAX_JSON_DEPTH` levels (deeper input, which would exhaust Python's recursion, is a 400 too).
"""

from __future__ import annotations

import json
import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from megatron_camopd.rollout.sampling import SamplingParams
from megatron_camopd.rollout.sglang_protocol import max_input_tokens

MAX_ITEMS = 4096  # prompts per request
MAX_TOTAL_TOKENS = 4_000_000  # prompt tokens per request
MAX_JSON_DEPTH = 32  # nesting levels of a request body (SGLang's deepest field is 3)
_EPS = 1e-6  # SGLang: temperature below this is greedy

# GenerateReqInput fields answered as SGLang answers them, and bookkeeping fields that change nothing here
_SUPPORTED = {
    "text",
    "input_ids",
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
}
_INERT = {
    "rid",
    "log_metrics",
    "no_logs",
    "custom_labels",
    "priority",
    "routed_dp_rank",
    "data_parallel_rank",
    "extra_key",
    "conversation_id",
    "routing_key",
    "received_time",
    "external_trace_header",
}
# GenerateReqInput fields this server does not implement: accepted only with their default value
_UNSUPPORTED = {
    "input_embeds": None,
    "image_data": None,
    "video_data": None,
    "audio_data": None,
    "token_ids_logprob": None,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "lora_path": None,
    "lora_id": None,
    "custom_logit_processor": None,
    "session_params": None,
    "modalities": None,
    "stream": False,
    "return_entropy": False,
    "bootstrap_host": None,
    "bootstrap_port": None,
    "bootstrap_room": None,
    "positional_embed_overrides": None,
    "return_prompt_token_ids": False,
    "return_bytes": False,
    "background": False,
}
# SamplingParams fields this server does not implement: accepted only with their default value
_SAMPLING_UNSUPPORTED = {
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "n": 1,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "custom_params": None,
    "logit_bias": None,
}
_SAMPLING_SUPPORTED = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "stream_interval",
    "sampling_seed",
}


class ApiError(Exception):
    """A request the server refuses with 400; `field` is the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class GenItem:
    """One prompt of a request, checked."""

    ids: list[int]
    params: SamplingParams  # stop_token_ids and max_new_tokens included
    seed: int
    ignore_eos: bool = False
    stop_strs: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_logprob: bool = False
    logprob_start: int = 0  # first prompt position whose log-prob is returned
    top_logprobs_num: int = 0
    with_text: bool = False
    rid: str = ""

    @property
    def max_new(self) -> int:
        return self.params.max_new_tokens

    def group_key(self) -> tuple:
        """Items with equal keys decode in one batch (same sampling parameters)."""
        p = self.params
        return (p.temperature, p.top_p, p.top_k, p.greedy, tuple(sorted(p.stop_token_ids)), self.ignore_eos)


def _no_constant(name: str) -> Any:
    raise ApiError("body", f"{name} is not valid JSON (numbers must be finite)")


def load_json(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value of a request body; ApiError("body", ...) when it is not strict JSON or nests deeper than
    `max_depth` (input deep enough to exhaust the decoder's recursion is refused the same way)."""
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError("body", f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ApiError("body", f"malformed JSON: {exc}") from None
    stack = [(obj, 1)] if isinstance(obj, (list, dict)) else []
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise ApiError("body", f"JSON nested deeper than {max_depth} levels")
        stack.extend(
            (v, depth + 1)
            for v in (value.values() if isinstance(value, dict) else value)
            if isinstance(v, (list, dict))
        )
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(name, f"must be a finite number, got {v!r:.40}")
    return float(v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ApiError(name, f"must be true or false, got {v!r:.40}")
    return v


def _per_item(value: Any, n: int, name: str, batched: bool) -> list[Any]:
    if batched and isinstance(value, list):
        if len(value) != n:
            raise ApiError(name, f"has {len(value)} entries for a batch of {n} prompts")
        return value
    return [value] * n


def _prompts(body: dict, vocab: int, tokenizer: Any, context_len: int) -> tuple[list[list[int]], bool]:
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise ApiError("input_ids", "give exactly one of text or input_ids")
    if text is not None:
        if tokenizer is None:
            raise ApiError("text", "this server has no tokenizer: send input_ids")
        batched = isinstance(text, list)
        texts = text if batched else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError("text", "must be a string or a non-empty list of strings")
        if len(texts) > MAX_ITEMS:
            raise ApiError("text", f"at most {MAX_ITEMS} prompts per request")
        seqs = [list(tokenizer.hf.encode(t)) for t in texts]
        for n, seq in enumerate(seqs):
            if not seq:
                raise ApiError(f"text[{n}]" if batched else "text", "encodes to no tokens")
        return seqs, batched
    batched = isinstance(ids, list) and bool(ids) and all(isinstance(r, list) for r in ids)
    id_seqs: list[Any] = ids if batched and isinstance(ids, list) else [ids]
    if len(id_seqs) > MAX_ITEMS:
        raise ApiError("input_ids", f"at most {MAX_ITEMS} prompts per request")
    total = 0
    for n, seq in enumerate(id_seqs):
        where = f"input_ids[{n}]" if batched else "input_ids"
        if not isinstance(seq, list) or not seq:
            raise ApiError(where, "must be a non-empty list of token ids")
        if len(seq) >= context_len:  # before reading its ids: a huge prompt is refused at once
            raise ApiError(where, _too_long(len(seq), context_len))
        total += len(seq)
        if total > MAX_TOTAL_TOKENS:
            raise ApiError("input_ids", f"more than {MAX_TOTAL_TOKENS} prompt tokens in one request")
        for i, t in enumerate(seq):
            if not _is_int(t) or not 0 <= t < vocab:
                raise ApiError(f"{where}[{i}]", f"= {t!r:.40} is not a token id in [0, {vocab})")
    return id_seqs, batched


def _too_long(n: int, context_len: int) -> str:
    return f"the input ({n} tokens) is longer than the model's context length ({context_len} tokens)"


def _sampling(raw: Any, name: str, vocab: int, tokenizer: Any) -> dict[str, Any]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ApiError(name, "must be an object")
    for key in raw:
        if key not in _SAMPLING_SUPPORTED and key not in _SAMPLING_UNSUPPORTED:
            raise ApiError(f"{name}.{key}", "unknown sampling parameter")
    for key, default in _SAMPLING_UNSUPPORTED.items():
        if raw.get(key) is not None and raw.get(key) != default:
            raise ApiError(f"{name}.{key}", f"not supported by this server (only {default!r})")
    out: dict[str, Any] = {}
    mnt = raw.get("max_new_tokens", 128)
    mnt = 128 if mnt is None else mnt
    if not _is_int(mnt) or mnt < 0:
        raise ApiError(f"{name}.max_new_tokens", f"must be an integer >= 0, got {mnt!r:.40}")
    temp = 1.0 if raw.get("temperature") is None else _number(raw["temperature"], f"{name}.temperature")
    if temp < 0:
        raise ApiError(f"{name}.temperature", f"must be >= 0, got {temp}")
    top_p = 1.0 if raw.get("top_p") is None else _number(raw["top_p"], f"{name}.top_p")
    if not 0.0 < top_p <= 1.0:
        raise ApiError(f"{name}.top_p", f"must be in (0, 1], got {top_p}")
    top_k = -1 if raw.get("top_k") is None else raw["top_k"]
    if not _is_int(top_k) or (top_k < 1 and top_k != -1):
        raise ApiError(f"{name}.top_k", f"must be -1 (disable) or at least 1, got {top_k!r:.40}")
    stops = raw.get("stop_token_ids") or []
    if not isinstance(stops, list) or not all(_is_int(t) and 0 <= t < vocab for t in stops):
        raise ApiError(f"{name}.stop_token_ids", f"must be a list of token ids in [0, {vocab})")
    stop_strs = raw.get("stop")
    stop_strs = [] if stop_strs is None else [stop_strs] if isinstance(stop_strs, str) else stop_strs
    if not isinstance(stop_strs, list) or not all(isinstance(s, str) and s for s in stop_strs):
        raise ApiError(f"{name}.stop", "must be a string or a list of non-empty strings")
    if stop_strs and tokenizer is None:
        raise ApiError(f"{name}.stop", "stop strings need a tokenizer; this server has none")
    for key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
        if raw.get(key) is not None:
            out[key] = _bool(raw[key], f"{name}.{key}")
    interval = raw.get("stream_interval")
    if interval is not None and (not _is_int(interval) or interval < 1):
        raise ApiError(f"{name}.stream_interval", f"must be an integer >= 1, got {interval!r:.40}")
    seed = raw.get("sampling_seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise ApiError(f"{name}.sampling_seed", f"must be an integer in [0, 2**64), got {seed!r:.40}")
    greedy = temp < _EPS
    out.update(
        params=SamplingParams(
            temperature=1.0 if greedy else temp,
            top_p=top_p,
            top_k=max(top_k, 0),
            max_new_tokens=mnt,
            stop_token_ids=tuple(stops),
            greedy=greedy,
        ),
        stop_strs=stop_strs,
        seed=random.getrandbits(63) if seed is None else seed,
    )
    return out


def parse_generate(body: Any, *, vocab: int, context_len: int, tokenizer: Any = None) -> tuple[list[GenItem], bool]:
    """(items, batched) of one `/generate` body; ApiError naming the field otherwise."""
    if not isinstance(body, dict):
        raise ApiError("body", "request body must be a JSON object")
    for key in body:
        if key not in _SUPPORTED and key not in _INERT and key not in _UNSUPPORTED:
            raise ApiError(key, "unknown field (not in SGLang's GenerateReqInput)")
    for key, default in _UNSUPPORTED.items():
        if body.get(key) is not None and body.get(key) != default:
            raise ApiError(key, f"not supported by this server (only {default!r})")
    seqs, batched = _prompts(body, vocab, tokenizer, context_len)
    n = len(seqs)
    sp = _per_item(body.get("sampling_params"), n, "sampling_params", batched)
    ret_lp = _per_item(body.get("return_logprob", False), n, "return_logprob", batched)
    start = _per_item(body.get("logprob_start_len", -1), n, "logprob_start_len", batched)
    top = _per_item(body.get("top_logprobs_num", 0), n, "top_logprobs_num", batched)
    with_text = _bool(body.get("return_text_in_logprobs", False), "return_text_in_logprobs")
    rid = body.get("rid")
    items = []
    for i, ids in enumerate(seqs):
        sfx = f"[{i}]" if batched else ""
        s = _sampling(
            sp[i],
            f"sampling_params{sfx}" if isinstance(body.get("sampling_params"), list) else "sampling_params",
            vocab,
            tokenizer,
        )
        lp = False if ret_lp[i] is None else _bool(ret_lp[i], f"return_logprob{sfx}")
        st = -1 if start[i] is None else start[i]
        if not _is_int(st) or st < -1 or st >= len(ids):
            raise ApiError(
                f"logprob_start_len{sfx}", f"must be -1 or in [0, {len(ids)}) (the input length), got {st!r:.40}"
            )
        k = 0 if top[i] is None else top[i]
        if not _is_int(k) or not 0 <= k <= vocab:
            raise ApiError(f"top_logprobs_num{sfx}", f"must be an integer in [0, {vocab}], got {k!r:.40}")
        if len(ids) >= context_len:
            raise ApiError(
                f"input_ids{sfx}" if body.get("input_ids") is not None else f"text{sfx}",
                _too_long(len(ids), context_len),
            )
        if len(ids) > max_input_tokens(context_len):
            raise ApiError(
                f"input_ids{sfx}" if body.get("input_ids") is not None else f"text{sfx}",
                f"Input length ({len(ids)} tokens) exceeds the maximum allowed length "
                f"({max_input_tokens(context_len) + 1} tokens)",
            )
        mnt = s["params"].max_new_tokens
        if mnt and len(ids) + mnt > context_len:
            raise ApiError(
                f"sampling_params{sfx}.max_new_tokens",
                f"requested token count exceeds the model's maximum context length of {context_len} "
                f"tokens: {len(ids)} tokens from the input and {mnt} for the completion",
            )
        item_rid = (
            rid[i] if isinstance(rid, list) and i < len(rid) else f"{rid}_{i}" if rid and batched else rid
        ) or uuid.uuid4().hex
        items.append(
            GenItem(
                ids=list(ids),
                params=s["params"],
                seed=s["seed"],
                ignore_eos=s.get("ignore_eos", False),
                stop_strs=s["stop_strs"],
                skip_special_tokens=s.get("skip_special_tokens", True),
                no_stop_trim=s.get("no_stop_trim", False),
                return_logprob=lp,
                logprob_start=len(ids) - 1 if st == -1 else st,
                top_logprobs_num=k,
                with_text=with_text,
                rid=str(item_rid),
            )
        )
    return items, batched


# ----------------------------------------------------------------------------------------- answers


def _text(tokenizer: Any, ids: list[int], skip: bool = False) -> str:
    return "" if tokenizer is None or not ids else tokenizer.decode(ids, skip_special_tokens=skip)


def _token_texts(tokenizer: Any, ids: list[int], with_text: bool) -> list[str | None]:
    return [_text(tokenizer, [i]) for i in ids] if with_text and tokenizer is not None else [None] * len(ids)


def build_answer(
    item: GenItem,
    *,
    output: list[int],
    output_lps: list[float],
    finish: dict,
    scores: Any,
    tokenizer: Any,
    weight_version: str,
    latency_s: float,
) -> dict[str, Any]:
    """One SGLang-shaped answer. `scores` (TeacherScores of prompt + output, positions 1..) is needed when
    log-probs of prompt positions or top log-probs are asked for; `output_lps` are the rollout log-probs."""
    ids, n_in = item.ids, len(item.ids)
    text_out = output
    if finish.get("type") == "stop" and not item.no_stop_trim and isinstance(finish.get("matched"), int):
        text_out = output[:-1]  # the matched stop token is trimmed from the text (not from output_ids)
    text = _text(tokenizer, text_out, item.skip_special_tokens)
    if isinstance(finish.get("matched"), str) and not item.no_stop_trim:
        text = text[: text.find(finish["matched"])] if finish["matched"] in text else text
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": finish,
        "prompt_tokens": n_in,
        "completion_tokens": len(output),
        "cached_tokens": 0,
        "weight_version": weight_version,
        "e2e_latency": latency_s,
    }
    if item.return_logprob:
        full = ids + output
        texts = _token_texts(tokenizer, full, item.with_text)
        lps = scores.logprobs.tolist() if scores is not None else None
        first = item.logprob_start  # SGLang: the first returned entry never has a log-prob
        meta["input_token_logprobs"] = [
            [None if p == first or lps is None else lps[p - 1], ids[p], texts[p]] for p in range(first, n_in)
        ]
        meta["output_token_logprobs"] = [[output_lps[t], output[t], texts[n_in + t]] for t in range(len(output))]
        if item.top_logprobs_num:
            tid, tlp = scores.topk_ids.tolist(), scores.topk_logprobs.tolist()

            def row(p: int) -> list:  # the top-k at position p (predicting full[p])
                return [
                    [lp, t, _text(tokenizer, [t]) if item.with_text else None] for lp, t in zip(tlp[p - 1], tid[p - 1])
                ]

            meta["input_top_logprobs"] = [None if p == first else row(p) for p in range(first, n_in)]
            meta["output_top_logprobs"] = [row(n_in + t) for t in range(len(output))]
    return {"text": text, "output_ids": list(output), "meta_info": meta}


def needs_scores(item: GenItem) -> bool:
    """Whether the answer needs a scoring pass over prompt + output (prompt log-probs or top log-probs)."""
    return item.return_logprob and (item.top_logprobs_num > 0 or item.logprob_start < len(item.ids) - 1)


def apply_stop_strings(tokenizer: Any, output: list[int], stop_strs: list[str]) -> tuple[int, str] | None:
    """(tokens kept, matched string) for the first prefix of `output` whose text contains a stop string. Sampling
    draws per-token uniforms of the sample's own stream, so cutting a finished response here gives exactly what
    stopping during decoding would have."""
    if not stop_strs:
        return None
    for t in range(1, len(output) + 1):
        text = tokenizer.decode(output[:t], skip_special_tokens=False)
        for s in stop_strs:
            if s in text:
                return t, s
    return None
