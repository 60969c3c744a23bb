"""The lm-evaluation-harness export: YAML that parses with the fields lm-eval needs, data rows, scorer filters."""

from __future__ import annotations

import json
import re

import pytest

import yaml
from megatron_camopd.data.verifiers import mc_letter, numeric
from megatron_camopd.errors import SpecError
from megatron_camopd.evaluate.lm_eval_export import export_lm_eval
from megatron_camopd.evaluate.tasks import EvalTask, load_tasks


def _apply_regex_filter(step: dict, text: str) -> str:
    """lm-eval's RegexFilter: findall, pick ``group_select``, '[invalid]' when nothing matches."""
    matches = re.findall(step["regex_pattern"], text)
    return matches[step.get("group_select", 0)] if matches else "[invalid]"


def test_export_writes_a_well_formed_generate_until_task(tmp_path) -> None:
    (task,) = load_tasks(["arithmetic"], limit=7)
    paths = export_lm_eval(task, tmp_path / "lm", max_new_tokens=32)
    cfg = yaml.safe_load(paths["yaml"].read_text())
    for key in (
        "task",
        "dataset_path",
        "dataset_kwargs",
        "test_split",
        "output_type",
        "doc_to_text",
        "doc_to_target",
        "generation_kwargs",
        "metric_list",
    ):
        assert key in cfg, key
    assert cfg["task"] == "camopd_arithmetic" and cfg["output_type"] == "generate_until"
    assert cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
    data = cfg["dataset_kwargs"]["data_files"]["test"]
    assert data == str(paths["data"]) and paths["data"].is_absolute()
    assert cfg["generation_kwargs"] == {
        "until": ["<|im_end|>", "<|endoftext|>"],
        "do_sample": False,
        "max_gen_toks": 32,
    }
    assert cfg["metric_list"][0]["metric"] == "exact_match"
    rows = [json.loads(line) for line in paths["data"].read_text().splitlines()]
    assert len(rows) == 7
    for row, ex in zip(rows, task.examples):
        assert row["prompt"] == ex["messages"][-1]["content"] and row["answer"] == ex["answer"]
        # the templates only reference fields every row has
        for field in re.findall(r"\{\{(\w+)\}\}", cfg["doc_to_text"] + cfg["doc_to_target"]):
            assert field in row


@pytest.mark.parametrize(
    "verifier,scorer,cases",
    [
        (
            "mc_letter",
            mc_letter,
            [
                ("Reasoning... Final answer: C", "C"),
                ("final answer: b", "B"),
                ("Final answer: A then Final answer: D", "D"),
                ("no letter", "A"),
            ],
        ),
        ("numeric", numeric, [("so it is 1,234", "1234"), ("3 then 42", "42"), ("-7", "-7"), ("none", "5")]),
    ],
)
def test_exported_filters_score_like_the_project_verifier(tmp_path, verifier, scorer, cases) -> None:
    examples = [
        {"uid": str(i), "messages": [{"role": "user", "content": "q"}], "answer": ans}
        for i, (_, ans) in enumerate(cases)
    ]
    cfg = yaml.safe_load(export_lm_eval(EvalTask("t", examples, verifier, "x"), tmp_path)["yaml"].read_text())
    steps = cfg["filter_list"][0]["filter"]
    assert steps[-1]["function"] == "take_first"
    ignore = cfg["metric_list"][0].get("regexes_to_ignore", [])
    for response, answer in cases:
        got = _apply_regex_filter(steps[0], response)
        if any(s["function"] == "uppercase" for s in steps):
            got = got.upper()
        ref = answer
        for pattern in ignore:  # exact_match's regexes_to_ignore apply to prediction and reference
            got, ref = re.sub(pattern, "", got), re.sub(pattern, "", ref)
        assert float(got == ref) == scorer(response, answer), (response, answer)


def test_code_tasks_are_not_exportable(tmp_path) -> None:
    task = EvalTask("c", [{"uid": "0", "messages": [{"role": "user", "content": "q"}], "answer": "x"}], "code", "x")
    with pytest.raises(SpecError, match="no lm-evaluation-harness equivalent"):
        export_lm_eval(task, tmp_path)
