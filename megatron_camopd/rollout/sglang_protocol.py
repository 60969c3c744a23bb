"""SGLang `/generate` sampling protocol, client side (sglang 0.5.x): the request for one rollout and the checks of
its answer. Pure functions: no HTTP, no Megatron.

Request (SGLang 0.5 `/generate`, python/sglang/srt/managers/io_struct.py GenerateReqInput): `{"input_ids",
"sampling_params": {"temperature", "top_p", "top_k" (-1 = off),
"max_new_tokens", "stop_token_ids", "skip_special_tokens": false, "no_stop_trim": true, "sampling_seed"},
"return_logprob": true, "top_logprobs_num": 1}`; greedy is temperature 0. The answer's `output_ids`,
`meta_info.output_token_logprobs` (`[logprob, id, text]`, log mu at T=1 with `SGLANG_RETURN_ORIGINAL_LOGPROB=1`),
`meta_info.output_top_logprobs` (the top-1 id per position), `meta_info.finish_reason.type` (stop | length |
abort) and `meta_info.weight_version` are checked like teacher answers: consistent lengths, echoed ids equal,
finite log-probs, ids in the vocabulary, a `stop` answer ends with a stop token and no stop token comes earlier,
a `length` answer has exactly the requested length. Anything else raises `RolloutError` (the sample is retried
on another replica and never trained on); `abort` (e.g. a server paused for a weight sync) is retried too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron_camopd.config.serving import (  # noqa: F401 -- the pinned SGLang's facts, re-exported here
    SGLANG_INPUT_RESERVE,
    SGLANG_VERSION,
    context_for_inputs,
    max_input_tokens,
    server_limits,
)
from megatron_camopd.errors import RolloutError
from megatron_camopd.rollout.sampling import SamplingParams

_LP_SLACK = 1e-3  # log-probs are <= 0; top-1 is at least as likely as the sampled token (fp rounding slack)


def generate_request(prompt: list[int], params: SamplingParams, seed: int, max_new: int) -> dict[str, Any]:
    """The JSON body sampling one response of at most `max_new` tokens for `prompt` with its per-sample seed."""
    greedy = params.greedy or params.temperature == 0.0
    return {
        "input_ids": list(prompt),
        "sampling_params": {
            "temperature": 0.0 if greedy else float(params.temperature),
            "top_p": float(params.top_p),
            "top_k": int(params.top_k) if params.top_k and params.top_k > 0 else -1,
            "max_new_tokens": int(max_new),
            "stop_token_ids": sorted(int(t) for t in params.stop_token_ids),
            "skip_special_tokens": False,
            "no_stop_trim": True,
            "sampling_seed": int(seed),
        },
        "return_logprob": True,
        "top_logprobs_num": 1,
    }


@dataclass
class Generation:
    """One checked answer."""

    tokens: list[int]
    logprobs: list[float]
    top1: list[int]
    finish: str  # "stop" | "length"
    weight_version: str | None


def _entry(raw: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise RolloutError(f"{where}: expected [logprob, token_id, text], got {str(raw)[:80]}")
    return raw[0], raw[1]


def _logprob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RolloutError(f"{where}: log-prob {value!r:.40} is not a finite number")
    if value > _LP_SLACK:
        raise RolloutError(f"{where}: log-prob {value!r} is positive")
    return float(value)


def _token(value: Any, vocab: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise RolloutError(f"{where}: token id {value!r:.40} is not in [0, {vocab})")
    return value


def parse_generation(obj: Any, *, max_new: int, stops: set[int], vocab: int, where: str) -> Generation:
    """Check one `/generate` answer for a request of `max_new` tokens; `stops` are the ids that end a response
    (the request's stop_token_ids and the model's end-of-sequence id)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("meta_info"), dict):
        raise RolloutError(f"{where}: answer has no meta_info object: {str(obj)[:200]}")
    meta = obj["meta_info"]
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind == "abort":
        raise RolloutError(f"{where}: the server aborted the sample ({finish.get('message', 'no message')})")
    if kind not in ("stop", "length"):
        raise RolloutError(f"{where}: meta_info.finish_reason.type is {kind!r}, expected stop, length or abort")
    ids = obj.get("output_ids")
    if not isinstance(ids, list):
        raise RolloutError(f"{where}: output_ids is {type(ids).__name__}, expected a list of token ids")
    tokens = [_token(t, vocab, f"{where}: output_ids[{i}]") for i, t in enumerate(ids)]
    n = len(tokens)
    if not 1 <= n <= max_new:
        raise RolloutError(f"{where}: output_ids has {n} tokens, asked for 1..{max_new}")
    lps = meta.get("output_token_logprobs")
    if not isinstance(lps, list) or len(lps) != n:
        got = len(lps) if isinstance(lps, list) else type(lps).__name__
        raise RolloutError(f"{where}: meta_info.output_token_logprobs has {got} entries for {n} output_ids")
    tops = meta.get("output_top_logprobs")
    if not isinstance(tops, list) or len(tops) != n:
        got = len(tops) if isinstance(tops, list) else type(tops).__name__
        raise RolloutError(f"{where}: meta_info.output_top_logprobs has {got} entries for {n} output_ids")
    logprobs, top1 = [], []
    for t in range(n):
        lp, tid = _entry(lps[t], f"{where}: output_token_logprobs[{t}]")
        if tid != tokens[t]:
            raise RolloutError(f"{where}: output_token_logprobs[{t}] is for token {tid!r}, output_ids has {tokens[t]}")
        logprobs.append(_logprob(lp, f"{where}: output_token_logprobs[{t}]"))
        row = tops[t]
        if not isinstance(row, list) or not row:
            raise RolloutError(f"{where}: output_top_logprobs[{t}] is {str(row)[:60]}, expected [[logprob, id, text]]")
        top_lp, top_id = _entry(row[0], f"{where}: output_top_logprobs[{t}]")
        top1.append(_token(top_id, vocab, f"{where}: output_top_logprobs[{t}]"))
        if _logprob(top_lp, f"{where}: output_top_logprobs[{t}]") < logprobs[-1] - _LP_SLACK:
            raise RolloutError(f"{where}: output_top_logprobs[{t}] is less likely than the sampled token")
    early = [t for t in range(n - 1) if tokens[t] in stops]
    if early:
        raise RolloutError(
            f"{where}: stop token {tokens[early[0]]} at position {early[0]} but the response goes on "
            f"to {n} tokens (stop handling inconsistent)"
        )
    if kind == "stop":
        # the server stops on our stop ids and on its own end-of-sequence ids (e.g. several in a generation_config)
        matched = finish.get("matched")
        ours = tokens[-1] in stops and (matched is None or matched == tokens[-1])
        if not ours and not (_is_id(matched) and matched == tokens[-1]):
            raise RolloutError(
                f"{where}: finish_reason stop (matched {matched!r}) but the last token {tokens[-1]} is "
                "not the stop token (no_stop_trim must keep it)"
            )
    elif n != max_new and tokens[-1] not in stops:
        raise RolloutError(f"{where}: finish_reason length after {n} tokens, asked for {max_new}")
    version = meta.get("weight_version")
    return Generation(
        tokens,
        logprobs,
        top1,
        "stop" if kind == "stop" or tokens[-1] in stops else "length",
        None if version is None else str(version),
    )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def version_lag(version: str | None, trainer_version: int) -> int | None:
    """Optimizer steps a rollout sampled with `version` lags the trainer's; None when it is not a step number."""
    try:
        return trainer_version - int(str(version))
    except (TypeError, ValueError):
        return None
