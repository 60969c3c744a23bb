"""Export an evaluation task to lm-evaluation-harness (a task YAML + its JSONL data) instead of re-implementing it.

``export_lm_eval(task, out_dir)`` writes ``<out_dir>/<task>.jsonl`` (``uid``, ``prompt``, ``system``,
``messages``, ``answer``) and ``<out_dir>/<task>.yaml``, a ``generate_until`` task reading that file through the
``json`` dataset builder, with greedy decoding and a scorer equivalent to the project's verifier:

* ``exact_match``: lm-eval's ``exact_match`` with surrounding whitespace ignored;
* ``mc_letter``: a regex filter keeping the letter of the LAST ``Final answer: <letter>``, then exact match;
* ``numeric``: a regex filter keeping the last number (thousands separators ignored), then exact match
  (string equality, so ``2.0`` vs ``2`` differs from the project's tolerance-based check).

Run: ``lm_eval run --model hf --model_args pretrained=HF_DIR --include_path OUT_DIR --tasks camopd_<task>
--apply_chat_template`` (``prompt`` is the user turn; ``system`` goes to ``--system_instruction``).
The ``code`` verifier has no lm-eval equivalent and is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from megatron_camopd.errors import SpecError
from megatron_camopd.evaluate.tasks import EvalTask

_WS_EDGES = [r"^\s+", r"\s+$"]
_FINAL_LETTER = r"(?i)final\s*answer\s*(?:is)?\s*[:：]?\s*\**\s*[\(\[]?\s*([A-Za-z])\b"
_LAST_NUMBER = r"([-+]?\d[\d,]*(?:\.\d+)?)"


def _prompt_fields(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(system text, prompt text): the user turn, or the whole dialogue as text when there are several turns."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return system, turns[0]["content"]
    return system, "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def _scoring(verifier: str) -> dict[str, Any]:
    exact = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
    if verifier == "exact_match":
        return {
            "metric_list": [
                {**exact, "ignore_case": False, "ignore_punctuation": False, "regexes_to_ignore": _WS_EDGES}
            ]
        }
    if verifier == "mc_letter":
        filt = [
            {"function": "regex", "regex_pattern": _FINAL_LETTER, "group_select": -1},
            {"function": "uppercase"},
            {"function": "take_first"},
        ]
        return {
            "filter_list": [{"name": "final-letter", "filter": filt}],
            "metric_list": [{**exact, "ignore_case": True, "ignore_punctuation": False}],
        }
    if verifier == "numeric":
        filt = [{"function": "regex", "regex_pattern": _LAST_NUMBER, "group_select": -1}, {"function": "take_first"}]
        return {
            "filter_list": [{"name": "last-number", "filter": filt}],
            "metric_list": [
                {**exact, "ignore_case": False, "ignore_punctuation": False, "regexes_to_ignore": [","] + _WS_EDGES}
            ],
        }
    raise SpecError(
        f"--export-lm-eval: verifier '{verifier}' has no lm-evaluation-harness equivalent "
        "(exportable: exact_match, mc_letter, numeric)"
    )


def lm_eval_task_name(task: str) -> str:
    return "camopd_" + re.sub(r"[^A-Za-z0-9_]+", "_", task)


def export_lm_eval(
    task: EvalTask,
    out_dir: str | Path,
    max_new_tokens: int = 256,
    stop: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>"),
) -> dict[str, Path]:
    """Write the task's data and YAML under ``out_dir``; returns {"yaml": path, "data": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = lm_eval_task_name(task.name)
    scoring = _scoring(task.verifier)
    data_path = (out / f"{name}.jsonl").resolve()
    with data_path.open("w", encoding="utf-8") as fh:
        for ex in task.examples:
            system, prompt = _prompt_fields(ex["messages"])
            row = {
                "uid": ex["uid"],
                "prompt": prompt,
                "system": system,
                "messages": ex["messages"],
                "answer": str(ex["answer"]),
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": list(stop), "do_sample": False, "max_gen_toks": max_new_tokens},
        "num_fewshot": 0,
        **scoring,
        "metadata": {"version": 1.0, "source": task.source, "verifier": task.verifier},
    }
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return {"yaml": yaml_path, "data": data_path}
