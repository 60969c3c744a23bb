"""IFBench's own checkers on canned responses (one that follows an instruction, one that breaks it), offline, and
`camopd eval --bench ifbench` on a tiny model writing IFBench's files and the table."""

from __future__ import annotations

import json

import pytest

from megatron_camopd.evaluate.harness.ifbench import (
    data_file,
    offline_checkers,
    score_responses,
)
from megatron_camopd.evaluate.main import eval_main

pytest.importorskip("ifbench")


def _nltk_has(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def test_ifbench_checkers_tell_a_following_response_from_a_violating_one() -> None:
    with offline_checkers() as lib:
        inputs = {inp.key: inp for inp in lib.read_prompt_list(str(data_file()))}
        assert len(inputs) == 294
        kw, ws = inputs["0"], next(i for i in inputs.values() if i.instruction_id_list == ["format:no_whitespace"])
        assert kw.instruction_id_list == ["count:keywords_multiple"]  # kaleidoscope x1, nebula x2, ... paradox x7
        good = " ".join(["kaleidoscope"] + ["nebula"] * 2 + ["whisper"] * 3 + ["labyrinth"] * 5 + ["paradox"] * 7)
        bad = good.replace("paradox", "riddle", 1)  # paradox six times
        for response, expected in ((good, True), (bad, False)):
            scored = score_responses([kw], {kw.prompt: response}, lib)
            assert [o.follow_all_instructions for o in scored["strict"]] == [expected]
            assert [o.follow_instruction_list for o in scored["loose"]] == [[expected]]
        scored = score_responses([ws], {ws.prompt: "No_spaces_here."}, lib)
        assert scored["strict"][0].follow_all_instructions
        assert not score_responses([ws], {ws.prompt: "two words"}, lib)["strict"][0].follow_all_instructions
        # a checker that needs NLTK's stopword list: scored when the data is installed, else reported unscored
        stop = next(i for i in inputs.values() if i.instruction_id_list == ["ratio:stop_words"])
        scored = score_responses([stop], {stop.prompt: "The cat sat on the mat."}, lib)
        if _nltk_has("corpora/stopwords"):
            assert len(scored["strict"]) == 1 and not scored["unscored"]
        else:
            assert scored["strict"] == [] and scored["unscored"][0]["key"] == stop.key


@pytest.mark.timeout(300)
def test_bench_ifbench_on_a_tiny_model_writes_ifbench_files_and_the_table(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "ev"
    assert (
        eval_main(
            [str(tiny_model_dir), "--bench", "ifbench", "--limit", "2", "--max-new-tokens", "8", "--out-dir", str(out)]
        )
        == 0
    )
    rows = [json.loads(x) for x in (out / "ifbench" / "output.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "response"}
    strict = [json.loads(x) for x in (out / "ifbench" / "eval_results_strict.jsonl").read_text().splitlines()]
    assert set(strict[0]) == {
        "instruction_id_list",
        "prompt",
        "response",
        "follow_all_instructions",
        "follow_instruction_list",
    }
    assert [s["response"] for s in strict] == [r["response"] for r in rows]
    metrics = json.loads((out / "ifbench" / "metrics.json").read_text())
    assert {"strict:prompt-level", "loose:instruction-level", "strict:count:keywords_multiple"} <= set(metrics)
    ours = json.loads((out / "results.json").read_text())["benchmarks"]["ifbench"]
    assert ours["metrics"]["strict:prompt-level"] == metrics["strict:prompt-level"] and ours["n"] == 2
