"""`camopd sft`: response-only cross-entropy on chat data through the same Megatron backend."""

from __future__ import annotations

import json

import pytest

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import run_train, sft_batch_check, tiny_overrides


@pytest.mark.multiproc
def test_sft_trains_on_responses_only(tiny_root, tmp_path):
    over = tiny_overrides(
        tiny_root,
        tmp_path / "sft",
        "method.name=sft",
        "train.steps=8",
        "train.lr=3e-3",
        "data.streams.0.limit=8",
        "data.streams.1.limit=8",
    )
    rows = run_on_ranks(run_train, 1, over)[0]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    answers = {json.loads(line)["answer"] for line in (tiny_root / "data" / "general.jsonl").read_text().splitlines()}
    answers |= {json.loads(line)["answer"] for line in (tiny_root / "data" / "domain.jsonl").read_text().splitlines()}
    for labels, eos, text in run_on_ranks(sft_batch_check, 1, over)[0]:
        assert labels[-1] == eos and text in answers  # the masked labels are exactly the answer + end of turn
