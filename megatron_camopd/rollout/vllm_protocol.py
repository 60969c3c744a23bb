"""vLLM's OpenAI-compatible `/v1/completions` as a rollout protocol (vLLM 0.32.0, read from its source), client
side: the request sampling one response and the checks of its answer. Pure functions: no HTTP, no Megatron.

Request (`entrypoints/openai/completion/protocol.py` CompletionRequest): the prompt as token ids (`prompt: [ids]`),
`max_tokens`, `temperature` (0: greedy), `top_p`, `top_k` (-1 = off), the per-sample `seed` (vLLM seeds a
generator of its own per request: the tokens are reproducible on one server, not the in-process engine's),
`stop_token_ids` (the model's end-of-sequence id included: the trainer decides what ends a response),
`ignore_eos: true` (so vLLM's own end-of-sequence ids from the generation config end nothing the trainer does
not know of), `logprobs: 1` (the sampled token's log-prob and the top-1 per position),
`return_tokens_as_token_ids: true` (tokens named `token_id:<id>`, so the top-1 is an id, not a text),
`return_token_ids: true` (the generated ids), `skip_special_tokens: false`. The sampled log-probs are of the raw
distribution (temperature 1, before top-k/top-p), the trainer's `mu`, when the server runs with
`--logprobs-mode raw_logprobs` (vLLM's default, which `launch/servers.py` passes explicitly).

The answer's `choices[0]`: `token_ids`, `logprobs.tokens` / `.token_logprobs` / `.top_logprobs`, `finish_reason`
(stop | length | abort) are checked like SGLang's (`sglang_protocol.parse_generation`): consistent lengths, the
logged tokens equal the ids, finite non-positive log-probs, ids in the vocabulary, a `stop` answer ends with a
stop token and none comes earlier, a `length` answer has exactly the requested length. Anything else, and an
`abort`, raises `RolloutError` (the sample is retried on another replica and never trained on). vLLM answers no
weight version: the sampler stamps the version it synced (`rollout/vllm.py`).
"""

from __future__ import annotations

from typing import Any

from megatron_camopd.errors import RolloutError
from megatron_camopd.rollout.sampling import SamplingParams
from megatron_camopd.rollout.sglang_protocol import Generation
from megatron_camopd.teachers.vllm_protocol import COMPLETIONS, MODELS, max_input_tokens  # noqa: F401 -- re-exported

_LP_SLACK = 1e-3  # log-probs are <= 0; top-1 is at least as likely as the sampled token (fp rounding slack)
_PREFIX = "token_id:"


def completion_request(prompt: list[int], params: SamplingParams, seed: int, max_new: int, stops: set[int]) -> dict:
    """The JSON body sampling one response of at most `max_new` tokens for `prompt` with its per-sample seed;
    `stops` are the ids that end a response (the params' stop ids and the model's end-of-sequence id)."""
    greedy = params.greedy or params.temperature == 0.0
    return {
        "prompt": [int(t) for t in prompt],
        "max_tokens": int(max_new),
        "temperature": 0.0 if greedy else float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k) if params.top_k and params.top_k > 0 else -1,
        "seed": int(seed),
        "stop_token_ids": sorted(int(t) for t in stops),
        "ignore_eos": True,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
        "skip_special_tokens": False,
    }


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise RolloutError(f"{where}: log-prob {value!r:.40} is not a finite number")
    if value > _LP_SLACK:
        raise RolloutError(f"{where}: log-prob {value!r} is positive")
    return float(value)


def _id(value: Any, vocab: int, where: str) -> int:
    if isinstance(value, str) and value.startswith(_PREFIX) and value[len(_PREFIX) :].isdigit():
        value = int(value[len(_PREFIX) :])
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise RolloutError(f"{where}: token {value!r:.40} is not an id in [0, {vocab})")
    return value


def parse_completion(obj: Any, *, max_new: int, stops: set[int], vocab: int, where: str) -> Generation:
    """Check one `/v1/completions` answer for a request of `max_new` tokens (see the module docstring)."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise RolloutError(f"{where}: expected one completion choice, got {str(obj)[:200]}")
    choice = choices[0]
    kind = choice.get("finish_reason")
    if kind == "abort":
        raise RolloutError(f"{where}: the server aborted the sample")
    if kind not in ("stop", "length"):
        raise RolloutError(f"{where}: finish_reason is {kind!r}, expected stop, length or abort")
    ids = choice.get("token_ids")
    if not isinstance(ids, list):
        raise RolloutError(f"{where}: token_ids is {type(ids).__name__}, expected a list (return_token_ids)")
    tokens = [_id(t, vocab, f"{where}: token_ids[{i}]") for i, t in enumerate(ids)]
    n = len(tokens)
    if not 1 <= n <= max_new:
        raise RolloutError(f"{where}: token_ids has {n} tokens, asked for 1..{max_new}")
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        raise RolloutError(f"{where}: logprobs is {type(lp).__name__}, expected an object (logprobs: 1)")
    named, lps, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
    for key, value in (("tokens", named), ("token_logprobs", lps), ("top_logprobs", tops)):
        if not isinstance(value, list) or len(value) != n:
            got = len(value) if isinstance(value, list) else type(value).__name__
            raise RolloutError(f"{where}: logprobs.{key} has {got} entries for {n} token_ids")
    assert isinstance(named, list) and isinstance(lps, list) and isinstance(tops, list)
    logprobs, top1 = [], []
    for t in range(n):
        at = f"{where}: logprobs[{t}]"
        if _id(named[t], vocab, f"{at}.token") != tokens[t]:
            raise RolloutError(f"{at}: is for token {named[t]!r}, token_ids has {tokens[t]}")
        logprobs.append(_number(lps[t], at))
        row = tops[t]
        if not isinstance(row, dict) or not row:
            raise RolloutError(f"{at}: top_logprobs is {str(row)[:60]}, expected {{'token_id:<id>': logprob}}")
        best = max(row.items(), key=lambda kv: _number(kv[1], f"{at}.top_logprobs"))
        top1.append(_id(best[0], vocab, f"{at}.top_logprobs"))
        if _number(best[1], at) < logprobs[-1] - _LP_SLACK:
            raise RolloutError(f"{at}: the top-1 token is less likely than the sampled token")
    early = [t for t in range(n - 1) if tokens[t] in stops]
    if early:
        raise RolloutError(
            f"{where}: stop token {tokens[early[0]]} at position {early[0]} but the response goes on "
            f"to {n} tokens (stop handling inconsistent)"
        )
    if kind == "stop" and tokens[-1] not in stops:
        raise RolloutError(f"{where}: finish_reason stop but the last token {tokens[-1]} is not a stop token")
    if kind == "length" and n != max_new and tokens[-1] not in stops:
        raise RolloutError(f"{where}: finish_reason length after {n} tokens, asked for {max_new}")
    return Generation(tokens, logprobs, top1, "stop" if tokens[-1] in stops else "length", None)


def model_limits(obj: Any) -> tuple[int | None, int | None]:
    """(context length, longest accepted input) from a `/v1/models` answer (`max_model_len`; an input must be
    shorter, and prompt + max_tokens must fit it)."""
    data = obj.get("data") if isinstance(obj, dict) else None
    model = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    ctx = model.get("max_model_len")
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx <= 0:
        return None, None
    return ctx, max_input_tokens(ctx)
