"""`VllmTeacher`: a teacher served by vLLM's OpenAI-compatible server (`teachers.<name>.server: vllm`).

The same client as `HttpTeacher` -- replica pool, failover, retries, health probes, the all-dead deadline, the
start-up tokenizer check and routing -- speaking vLLM's `/v1/completions` instead of SGLang's `/generate`
(`vllm_protocol.py`): one request per sample, the prompt log-probs of the whole sequence, cut to the response.
`model_info` is `/v1/models` (the path the server loaded, from which the tokenizer check reads the served
vocabulary); `probe` reads the per-token texts vLLM reports (`decoded_token`); the input limit is
`max_model_len - 1`. vLLM reads no prefix cache for prompt log-probs, so a prompt's samples are not held back.
"""

from __future__ import annotations

from typing import Any

from ..errors import TeacherError
from .base import TeacherScores
from .http import HttpTeacher
from .vllm_protocol import (
    COMPLETIONS,
    MODELS,
    max_input_tokens,
    model_len_for_inputs,
    parse_scores,
    score_request,
    token_texts,
)
from .vllm_protocol import model_info as parse_model_info


class VllmTeacher(HttpTeacher):
    """A remote teacher behind one or more vLLM servers (`python -m vllm.entrypoints.openai.api_server`)."""

    SCORE_PATH = COMPLETIONS
    PREFIX_HOLDBACK = False

    def _score_body(self, ids: list[int], start: int, top_k: int | None) -> dict[str, Any]:
        return score_request(ids, top_k)

    def _parse_score(
        self, obj: Any, ids: list[int], start: int, top_k: int | None, body: dict[str, Any], url: str
    ) -> TeacherScores:
        return parse_scores(obj, ids, start, top_k, f"teacher {self.name} at {url}")

    def model_info(self, url: str | None = None) -> dict[str, Any]:
        """`GET /v1/models` of `url` (default: a live replica), as `{model_path, tokenizer_path, max_model_len}`."""
        return parse_model_info(self._info(MODELS, url), f"teacher {self.name}" + (f" at {url}" if url else ""))

    def server_info(self, url: str | None = None) -> dict[str, Any]:
        """What vLLM reports of itself: `/v1/models` plus `/version`."""
        info = self.model_info(url)
        info["version"] = self._info("/version", url).get("version")
        return info

    def max_input_tokens(self, url: str) -> int | None:
        max_len = self.model_info(url).get("max_model_len")
        return max_input_tokens(max_len) if isinstance(max_len, int) else None

    def context_needed(self, n_tokens: int) -> tuple[str, int]:
        return "--max-model-len", model_len_for_inputs(n_tokens)

    def probe(self, ids: list[int], url: str | None = None, vocab_size: int | None = None) -> list[str | None]:
        """Per-token texts vLLM reports for `ids` (position 0 has none). `vocab_size` is unused: vLLM refuses an
        out-of-vocabulary id with a 400 rather than echoing another one."""
        if len(ids) < 2:
            raise TeacherError(f"teacher {self.name} probe: needs at least 2 ids, got {len(ids)}")
        body = score_request(list(ids), None)
        where = f"teacher {self.name} probe"
        check = lambda obj, u: token_texts(obj, ids, f"{where} at {u}")  # noqa: E731
        return self._pool.call(self._pool.with_retries(body, check, url, path=COMPLETIONS))
