"""`camopd eval --bench math500,mcq`: a real lm-evaluation-harness run on a tiny HF model with the shipped YAML
tasks (offline, --limit 2), lm-eval's own results files, and the shipped graders on canned responses."""

from __future__ import annotations

import importlib.util
import json

import pytest

import yaml
from megatron_camopd.errors import SpecError
from megatron_camopd.evaluate.harness import TASKS_DIR
from megatron_camopd.evaluate.main import eval_main

pytest.importorskip("lm_eval")


def _task_utils():
    spec = importlib.util.spec_from_file_location("camopd_task_utils", TASKS_DIR / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(300)
def test_bench_runs_lm_eval_and_keeps_its_results_files(tiny_model_dir, tmp_path, capsys) -> None:
    mcq = tmp_path / "medqa.jsonl"  # a user's MedQA file: three rows, MedQA's own field names
    mcq.write_text(
        "".join(
            json.dumps(
                {
                    "question": f"Q{i}?",
                    "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
                    "answer": "y",
                    "answer_idx": "B",
                }
            )
            + "\n"
            for i in range(3)
        )
    )
    out = tmp_path / "ev"
    assert (
        eval_main(
            [
                str(tiny_model_dir),
                "--bench",
                "math500,mcq",
                "--limit",
                "2",
                "--max-new-tokens",
                "8",
                "--batch-size",
                "2",
                "--mcq-data",
                str(mcq),
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    (results_file,) = (out / "lm_eval").rglob("results_*.json")
    res = json.loads(results_file.read_text())
    for key in ("results", "configs", "versions", "n-samples", "config", "lm_eval_version", "higher_is_better"):
        assert key in res, key
    assert res["n-samples"]["camopd_math500"] == {"original": 311, "effective": 2}  # MMATH's MATH500 rows
    assert res["n-samples"]["camopd_mcq"] == {"original": 3, "effective": 2}  # --mcq-data reached the task
    assert set(res["results"]["camopd_mcq"]) >= {"exact_match,final-letter", "exact_match_stderr,final-letter"}
    assert 0.0 <= res["results"]["camopd_math500"]["exact_match,none"] <= 1.0
    samples = {
        p.name.split("_2")[0]: [json.loads(x) for x in p.read_text().splitlines()]
        for p in results_file.parent.glob("samples_*.jsonl")
    }
    assert {k: len(v) for k, v in samples.items()} == {"samples_camopd_math500": 2, "samples_camopd_mcq": 2}
    prompt = samples["samples_camopd_mcq"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|im_start|>system\nYou are a careful medical reasoning assistant")  # chat template
    assert "Q0?\nA. x\nB. y" in prompt and prompt.endswith(
        '"Final answer: <letter>".<|im_end|>\n<|im_start|>assistant\n'
    )
    assert samples["samples_camopd_mcq"][0]["target"] == "B"
    ours = json.loads((out / "results.json").read_text())
    assert ours["benchmarks"]["lm_eval:camopd_mcq"]["file"] == str(results_file)
    assert (
        ours["benchmarks"]["lm_eval:camopd_mcq"]["metrics"]["exact_match,final-letter"]
        == res["results"]["camopd_mcq"]["exact_match,final-letter"]
    )
    table = (out / "results.md").read_text()
    assert "| lm_eval:camopd_math500 | exact_match,none |" in table and table in capsys.readouterr().out


def test_shipped_graders_score_canned_responses() -> None:
    from lm_eval.filters.extraction import RegexFilter

    utils = _task_utils()
    assert utils.process_math({"answer": "204"}, ["... so the walk takes \\boxed{204} minutes."]) == {
        "exact_match": 1.0
    }
    assert utils.process_math({"answer": "204"}, ["\\boxed{240}"])["exact_match"] == 0.0
    assert utils.math_correct("Thus $x = \\boxed{\\frac{1}{2}}$", "0.5")
    assert utils.math_correct("first \\boxed{3}, then finally \\boxed{\\dfrac{2}{4}}", "$\\frac{1}{2}$")
    assert not utils.math_correct("no answer at all", "7")
    docs = utils.load_math(sources="AIME2024,AIME2025")["test"]
    assert len(docs) == 45 and docs[0]["prompt"].endswith("put your final answer within \\boxed{}.")
    with pytest.raises(ValueError, match="known: \\['AIME2024'"):
        utils.load_math(sources="GSM8K")
    cfg = yaml.load((TASKS_DIR / "camopd_mcq.yaml").read_text(), Loader=yaml.BaseLoader)  # !function -> str
    regex = cfg["filter_list"][0]["filter"][0]
    filt = RegexFilter(regex_pattern=regex["regex_pattern"], group_select=int(regex["group_select"]))
    got = list(
        filt.apply(
            [
                ["Reasoning... Final answer: C"],
                ["final answer: (b) since"],
                ["Final answer: A. On reflection, Final answer: D"],
                ["I cannot tell"],
            ],
            docs=[{}] * 4,
        )
    )
    assert [g[0] for g in got] == ["C", "b", "D", "[invalid]"]
    assert len(utils.load_mcq()["test"]) == 8  # the shipped stand-in


def test_bench_errors_name_the_option_before_any_model_loads(tmp_path) -> None:
    missing = str(tmp_path / "no_model")  # never read: every error comes first
    with pytest.raises(SpecError, match="unknown benchmark 'gsm8k'"):
        eval_main([missing, "--bench", "math500,gsm8k"])
    with pytest.raises(SpecError, match="--mcq-data: .*nope.jsonl does not exist"):
        eval_main([missing, "--bench", "mcq", "--mcq-data", str(tmp_path / "nope.jsonl")])
    with pytest.raises(SpecError, match="--chat-template-kwargs: must be a JSON object"):
        eval_main([missing, "--bench", "mcq", "--chat-template-kwargs", "[1]"])
    with pytest.raises(SpecError, match="give --task .* and/or --bench"):
        eval_main([missing])
    with pytest.raises(SpecError, match="not an HF model directory"):
        eval_main([missing, "--bench", "mcq"])
