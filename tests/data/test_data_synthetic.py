"""Synthetic tasks: answers are right, seeded, short; every written format parses back through PromptStream."""

from pathlib import Path

import pytest

from megatron_camopd.data.prompts import PromptSource, PromptStream
from megatron_camopd.data.synthetic import (
    TASKS,
    accuracy,
    make_examples,
    make_mixture,
    score_exact,
    shift_letters,
    verifier_name,
    write_jsonl,
)
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.data.verifiers import get_verifier
from megatron_camopd.errors import DataError


def _solve(task: str, prompt: str) -> str:
    """An independent solver of each task's prompt text."""
    if task == "arithmetic":
        return str(eval(prompt.rstrip("=")))  # "12+7=" / "3-40=": digits and one operator only
    body = prompt.split(": ", 1)[1]
    if task == "reverse":
        return body[::-1]
    if task == "sort":
        return "".join(sorted(body))
    if task == "copy":
        return body
    if task == "count":
        return str(body.count(prompt.split(":")[0].split()[1]))
    if task == "cipher":
        return "".join("abcdefghijklmnopqrstuvwxyz"[("abcdefghijklmnopqrstuvwxyz".index(c) + 1) % 26] for c in body)
    raise AssertionError(task)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "mc"])
def test_answers_are_right(task: str) -> None:
    exs = make_examples(task, 50, seed=1)
    for ex in exs:
        assert ex["messages"] == [{"role": "user", "content": ex["prompt"]}]
        assert ex["answer"] == _solve(task, ex["prompt"])
        assert len(ex["prompt"]) <= 30
    assert make_examples(task, 50, seed=1) == exs
    assert make_examples(task, 50, seed=2) != exs


def test_mc_answer_letter_is_the_sum() -> None:
    for ex in make_examples("mc", 50, seed=0):
        a, b = map(int, ex["question"][len("What is ") : -1].split("+"))
        assert ex["options"][ex["answer"]] == str(a + b)
        assert sum(v == str(a + b) for v in ex["options"].values()) == 1


def test_length_range_and_helpers() -> None:
    for ex in make_examples("reverse", 30, seed=0, length_range=(5, 5)):
        assert len(ex["answer"]) == 5
    assert shift_letters("xyz a") == "yza b"
    assert score_exact(" 19 <|im_end|>", "19") == 1.0 and score_exact("190", "19") == 0.0
    assert accuracy(["1", "2", "x"], ["1", "2", "3"]) == pytest.approx(2 / 3)
    mix = make_mixture(["copy", "cipher"], 5, seed=0)
    assert len(mix) == 10 and {e["domain"] for e in mix} == {"general", "domain"}
    with pytest.raises(DataError, match="unknown synthetic task"):
        make_examples("poetry", 1)


@pytest.mark.parametrize("fmt", ["messages", "prompt", "nemotron", "coser", "medical_mc"])
def test_written_formats_parse(tmp_path: Path, tiny_tok: Tokenizer, fmt: str) -> None:
    exs = make_examples("mc" if fmt == "medical_mc" else "arithmetic", 12, seed=0)
    path = write_jsonl(exs, tmp_path / f"{fmt}.jsonl", fmt=fmt)
    s = PromptStream([PromptSource(str(path), fmt)], tiny_tok, shuffle=False)
    prompts = s.next_batch(12)
    assert [p.uid for p in prompts] == [e["uid"] for e in exs]
    assert [p.reference for p in prompts] == [e["answer"] for e in exs]
    verify = get_verifier(verifier_name("x", fmt))
    for p, e in zip(prompts, exs):
        right = f"Final answer: {e['answer']}" if fmt == "medical_mc" else e["answer"]
        assert verify(right, p.reference) == 1.0 and verify("wrong", p.reference) == 0.0
        assert p.messages[-1]["role"] == "user"  # reference replies (nemotron/coser) never reach the prompt
        assert tiny_tok.decode(p.prompt_ids).endswith(p.messages[-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    if fmt != "medical_mc":
        assert max(len(p.prompt_ids) for p in prompts) <= 64


def test_medical_mc_needs_mc_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="multiple-choice"):
        write_jsonl(make_examples("copy", 2), tmp_path / "x.jsonl", fmt="medical_mc")
