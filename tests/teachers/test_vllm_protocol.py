"""vLLM's `/v1/completions` scoring protocol, offline: the request body and the checks on answers shaped as vLLM
0.32.0 answers (the live server's answers are tested in tests/served/test_vllm_teacher.py)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_camopd.errors import TeacherError
from megatron_camopd.teachers import teacher_client
from megatron_camopd.teachers.http import HttpTeacher
from megatron_camopd.teachers.vllm import VllmTeacher
from megatron_camopd.teachers.vllm_protocol import (
    max_input_tokens,
    model_info,
    model_len_for_inputs,
    parse_scores,
    score_request,
    token_texts,
)

IDS = [5, 17, 42, 9]


def _answer(ids: list[int], k: int, echo: list[int] | None = None) -> dict:
    """An answer as vLLM builds it: position 0 null, then the sent token plus the k best (ids 1..k here; the
    sent token is among them when its id is <= k), log-prob of id t = -t / 10 and of a sent token -sent / 10."""
    entries: list = [None]
    for sent in ids[1:]:
        entry = {str(sent): {"logprob": -sent / 10, "rank": sent, "decoded_token": f"<{sent}>"}}
        for t in range(1, k + 1):
            entry.setdefault(str(t), {"logprob": -t / 10, "rank": t, "decoded_token": f"<{t}>"})
        entries.append(entry)
    return {"choices": [{"prompt_logprobs": entries, "prompt_token_ids": echo if echo is not None else ids}]}


def test_request_is_prefill_only_with_prompt_logprobs() -> None:
    assert score_request(IDS, None) == {
        "prompt": IDS,
        "max_tokens": 0,
        "echo": True,
        "prompt_logprobs": 0,
        "return_token_ids": True,
    }
    assert score_request(IDS, 4)["prompt_logprobs"] == 4
    assert max_input_tokens(256) == 255 and model_len_for_inputs(255) == 256


def test_scores_of_the_response_and_the_top_k() -> None:
    out = parse_scores(_answer(IDS, 0), IDS, 2, None, "t")
    assert torch.allclose(out.logprobs, torch.tensor([-4.2, -0.9])) and out.topk_ids is None
    ids = [5, 2, 42, 9]  # 2 is among the top 3 at position 1: that entry has 3 tokens, the others 4
    out = parse_scores(_answer(ids, 3), ids, 1, 3, "t")
    assert out.topk_ids is not None and out.topk_logprobs is not None
    assert out.topk_ids.tolist() == [[1, 2, 3]] * 3
    assert torch.allclose(out.topk_logprobs[0], torch.tensor([-0.1, -0.2, -0.3]))
    assert torch.allclose(out.logprobs, torch.tensor([-0.2, -4.2, -0.9]))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a["choices"][0].update(prompt_token_ids=[5, 17, 43, 9]), "differ from the ids we sent .*position 2"),
        (lambda a: a["choices"][0]["prompt_logprobs"].pop(), "has 3 entries, expected 4"),
        (lambda a: a["choices"][0]["prompt_logprobs"][2].pop("42"), r"prompt_logprobs\[2\] does not hold .*\(42\)"),
        (lambda a: a["choices"][0]["prompt_logprobs"].__setitem__(0, {}), "must be null"),
        (lambda a: a["choices"][0]["prompt_logprobs"][3]["9"].update(logprob=math.nan), "non-finite"),
        (lambda a: a["choices"][0]["prompt_logprobs"][3]["9"].update(logprob="x"), "not a number"),
        (lambda a: a.update(choices=[]), "expected one completion choice"),
    ],
)
def test_malformed_answers_are_refused(mutate, match) -> None:
    answer = _answer(IDS, 0)
    mutate(answer)
    with pytest.raises(TeacherError, match=match):
        parse_scores(answer, IDS, 1, None, "t")


def test_top_k_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(TeacherError, match=r"2 tokens, expected 3 or 4"):
        parse_scores(_answer(IDS, 1), IDS, 1, 3, "t")


def test_probe_texts_and_model_info() -> None:
    assert token_texts(_answer(IDS, 0), IDS, "t") == [None, "<17>", "<42>", "<9>"]
    info = model_info({"data": [{"id": "m", "root": "/models/m", "max_model_len": 256}]}, "t")
    assert info == {"model_path": "/models/m", "tokenizer_path": "/models/m", "served_model_name": "m",
                    "max_model_len": 256}  # fmt: skip
    with pytest.raises(TeacherError, match="lists no model"):
        model_info({"data": []}, "t")


def test_registry_names_each_engine_client() -> None:
    assert teacher_client("sglang") is HttpTeacher and teacher_client("vllm") is VllmTeacher
    assert issubclass(VllmTeacher, HttpTeacher) and not VllmTeacher.PREFIX_HOLDBACK
    with pytest.raises(ValueError, match="unknown teacher server 'x'"):
        teacher_client("x")
