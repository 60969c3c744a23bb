"""Outcome verifiers, and the code verifier in its sandbox: pass, timeout, memory limit, output cap.

Escape attempts on the sandbox (network, host files, processes, survivors) are in test_sandbox_escape.py."""

import time

import pytest

from megatron_camopd.data.sandbox import SandboxLimits, run_python
from megatron_camopd.data.verifiers import (
    code,
    exact_match,
    final_letter,
    get_verifier,
    last_number,
    mc_letter,
    numeric,
)
from megatron_camopd.errors import DataError, SpecError


def test_exact_match() -> None:
    assert exact_match("  hello \n world ", "hello world") == 1.0
    assert exact_match("hello world!", "hello world") == 0.0
    assert exact_match("Hello", "hello") == 0.0
    assert exact_match("x", None) == 0.0


def test_numeric() -> None:
    assert last_number("first 3, then 1,234.5 and finally -7.25") == -7.25
    assert last_number("total: 1,234") == 1234.0 and last_number("no digits") is None
    assert numeric("so the answer is 42.", "42") == 1.0
    assert numeric("42 or maybe 41", 42) == 0.0  # the LAST number counts
    assert numeric("x = 0.333333", 1 / 3) == 1.0 and numeric("x = 0.33", 1 / 3) == 0.0
    assert numeric("3.5e2", "350") == 1.0 and numeric("1,000,000", 1e6) == 1.0
    assert numeric("nothing", "1") == 0.0 and numeric("1", None) == 0.0


def test_mc_letter() -> None:
    assert final_letter("Final answer: B ... final answer: (c)") == "C"
    assert mc_letter("reasoning...\nFinal Answer: **D**", "d") == 1.0
    assert mc_letter("Final answer: A\nWait, Final answer: C", "A") == 0.0  # last occurrence wins
    assert mc_letter("The answer is A", "A") == 0.0  # the explicit pattern is required
    assert mc_letter("final answer:E", "E") == 1.0


def test_registry() -> None:
    assert get_verifier("numeric")("=5", 5) == 1.0
    with pytest.raises(SpecError, match="unknown verifier"):
        get_verifier("bleu")


ADD_IO = {"tests": [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "10 -4", "stdout": "6"}]}


def test_code_passes_io_and_asserts() -> None:
    prog = "Here you go:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n"
    assert code(prog, ADD_IO) == 1.0
    assert code("```python\nprint(0)\n```", ADD_IO) == 0.0
    assert code("def f(x):\n    return x * 2\n", {"asserts": ["assert f(2) == 4", "assert f(0) == 0"]}) == 1.0
    assert code("def f(x):\n    return x * 2\n", "assert f(2) == 5") == 0.0
    assert code("raise SystemExit(3)", "assert True") == 0.0
    with pytest.raises(DataError, match="no tests"):
        code("print(1)", {})


@pytest.mark.parametrize("exit_early", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_code_that_exits_before_the_asserts_does_not_pass(exit_early: str) -> None:
    wrong = f"def f(x):\n    return 0\n{exit_early}\n"
    assert code(wrong, {"asserts": ["assert f(2) == 4"]}) == 0.0
    right = "def f(x):\n    return x * 2\n"
    assert code(right, {"asserts": ["assert f(2) == 4"]}) == 1.0


def test_code_timeout() -> None:
    t0 = time.monotonic()
    res = run_python("while True:\n    pass\n", limits=SandboxLimits(wall_time_s=1.0))
    assert res.timed_out and not res.ok and time.monotonic() - t0 < 5
    assert code("import time\ntime.sleep(30)", "assert True", limits=SandboxLimits(wall_time_s=1.0)) == 0.0


def test_code_memory_limit() -> None:
    lim = SandboxLimits(memory_mb=256)
    res = run_python("x = bytearray(1024 ** 3)\nprint('allocated')", limits=lim)
    assert not res.ok and "MemoryError" in res.stderr and "allocated" not in res.stdout
    small = run_python("x = bytearray(16 * 1024 ** 2)\nprint('allocated')", limits=lim)
    assert small.ok and small.stdout == "allocated\n"


def test_output_flood_is_capped() -> None:
    res = run_python(
        "while True:\n    print('x' * 1000)\n", limits=SandboxLimits(wall_time_s=5.0, max_output_bytes=64 * 1024)
    )
    assert not res.ok and len(res.stdout) <= 64 * 1024
