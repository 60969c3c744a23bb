"""`camopd eval` end to end on a tiny model, batched generation, sampling/pass@k plumbing, task loading."""

from __future__ import annotations

import json
import math

import pytest

from megatron_camopd.data.verifiers import mc_letter
from megatron_camopd.errors import DataError, SpecError
from megatron_camopd.evaluate.core import evaluate_hf_model, mean_pass_at_k
from megatron_camopd.evaluate.main import eval_main
from megatron_camopd.evaluate.tasks import load_tasks, synthetic_examples


def test_left_padded_batches_match_one_by_one_and_accuracy_counts_matches(tiny_model) -> None:
    model, tok = tiny_model
    examples = synthetic_examples("reverse", 6) + synthetic_examples("arithmetic", 3)  # different prompt lengths
    single = evaluate_hf_model(model, tok, examples, "exact_match", max_new_tokens=6, batch_size=1, keep_responses=9)
    batched = evaluate_hf_model(model, tok, examples, "exact_match", max_new_tokens=6, batch_size=4, keep_responses=9)
    responses = [s["responses"][0] for s in single["samples"]]
    assert responses == [s["responses"][0] for s in batched["samples"]]
    assert len({len(tok.apply_chat_template(ex["messages"])) for ex in examples}) > 1
    # answers equal to the model's own greedy output on every other example: accuracy must be exactly 1/2
    rigged = [dict(ex, answer=r if i % 2 == 0 else r + "#") for i, (ex, r) in enumerate(zip(examples[:8], responses))]
    res = evaluate_hf_model(model, tok.hf, rigged, "exact_match", max_new_tokens=6, batch_size=3)
    assert res["accuracy"] == 0.5 and res["scores"] == [1.0, 0.0] * 4 and res["pass@1"] == 0.5


def test_sampling_reports_unbiased_pass_at_k_over_the_samples(tiny_model) -> None:
    model, tok = tiny_model
    examples = synthetic_examples("copy", 4)

    def even_length(response: str, reference: object) -> float:  # a verifier with mixed outcomes
        return float(len(response) % 2 == 0)

    kwargs = dict(max_new_tokens=5, batch_size=2, num_samples=4, temperature=1.0, ks=(1, 2, 4), seed=7)
    res = evaluate_hf_model(model, tok, examples, even_length, **kwargs)
    again = evaluate_hf_model(model, tok, examples, even_length, **kwargs)
    assert [s["responses"] for s in res["samples"]] == [s["responses"] for s in again["samples"]]  # seeded
    assert all(len(s["responses"]) == 4 for s in res["samples"])
    assert len({r for s in res["samples"] for r in s["responses"]}) > 4  # really sampled
    counts = [int(sum(s["correct"])) for s in res["samples"]]
    for k in (1, 2, 4):
        assert res[f"pass@{k}"] == pytest.approx(mean_pass_at_k(counts, 4, k))
        assert res[f"pass@{k}"] == pytest.approx(
            sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in counts) / len(counts)
        )
    assert res["accuracy"] == pytest.approx(sum(counts) / 16)
    with pytest.raises(SpecError, match="1 <= k <= n"):
        evaluate_hf_model(model, tok, examples, even_length, num_samples=2, temperature=1.0, ks=(4,))
    with pytest.raises(SpecError, match="temperature > 0"):
        evaluate_hf_model(model, tok, examples, even_length, num_samples=2, temperature=0.0, ks=(1,))


def test_eval_cli_on_hf_dir_and_on_checkpoint_root_writes_json_and_table(tiny_model_dir, tmp_path, capsys) -> None:
    from megatron_camopd.convert.main import convert_main

    common = ["--task", "reverse,mc", "--limit", "5", "--max-new-tokens", "6", "--batch-size", "3"]
    assert eval_main([str(tiny_model_dir), *common, "--out", str(tmp_path / "hf" / "res.json")]) == 0
    table = capsys.readouterr().out
    assert "| reverse | exact_match | 5 | 1 |" in table and "| mc |" in table
    res = json.loads((tmp_path / "hf" / "res.json").read_text())
    assert set(res["tasks"]) == {"reverse", "mc"}
    for r in res["tasks"].values():
        assert r["n_examples"] == 5 and 0.0 <= r["accuracy"] <= 1.0 and len(r["scores"]) == 5
        assert r["source"] == "synthetic(seed=1234, format=messages)"
    assert (tmp_path / "hf" / "res.md").read_text().startswith("| task | verifier |")

    convert_main(["--from-hf", str(tiny_model_dir), str(tmp_path / "ckpt")])
    assert eval_main([str(tmp_path / "ckpt"), *common, "--out", str(tmp_path / "ck" / "res.json")]) == 0
    from_ckpt = json.loads((tmp_path / "ck" / "res.json").read_text())
    for name in ("reverse", "mc"):  # same weights, greedy: identical responses
        assert from_ckpt["tasks"][name]["samples"] == res["tasks"][name]["samples"]


def test_medical_mc_tasks_are_scored_by_final_answer_letter(tmp_path) -> None:
    (task,) = load_tasks(["mc"], fmt="medical_mc", limit=3)
    assert task.verifier == "mc_letter"
    assert all(
        ex["answer"] in "ABCD" and "Final answer: <letter>" in ex["messages"][-1]["content"] for ex in task.examples
    )
    rows = [
        {"question": "Which?", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "B"},
        {"question": "Then?", "opa": "p", "opb": "q", "cop": 0},
    ]
    path = tmp_path / "med.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (med,) = load_tasks(["medqa"], data=str(path), fmt="medical_mc")
    assert med.verifier == "mc_letter" and [ex["answer"] for ex in med.examples] == ["B", "A"]
    assert mc_letter("I think A... Final answer: B", "B") == 1.0 and mc_letter("Final answer: B", "A") == 0.0


def test_file_tasks_need_answers_and_known_names(tmp_path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'answer'"):
        load_tasks(["qa"], data=str(path), fmt="prompt")
    (ok,) = load_tasks(["qa"], data=str(path), fmt="prompt", limit=1, verifier="numeric")
    assert ok.verifier == "numeric" and ok.examples[0]["messages"] == [{"role": "user", "content": "1+1="}]
    with pytest.raises(SpecError, match="not a synthetic task"):
        load_tasks(["gsm8k"])
    with pytest.raises(SpecError, match="unknown verifier"):
        load_tasks(["copy"], verifier="bleu")
    with pytest.raises(SpecError, match="one data file is one task"):
        load_tasks(["a", "b"], data=str(path), fmt="prompt")
