"""Served teachers end to end on the stand-in: `camopd serve-teacher` replicas of a camopd checkpoint (what SGLang
cannot serve) score exactly like the model in process, a teacher with another tokenizer is refused at start, and
a teacher that answers NaN gets its samples dropped and counted. (Training through real SGLang teachers that
lose a replica mid-run: `test_real_sglang.py`.)"""

from __future__ import annotations

import re

import pytest
import torch

from megatron_camopd.errors import CheckpointError
from megatron_camopd.serve.hf_scorer import HFScorer, load_scorer
from megatron_camopd.serve.megatron_scorer import checkpoint_kind
from megatron_camopd.serve.server import ServerThread
from megatron_camopd.teachers.base import TeacherScores
from megatron_camopd.teachers.http import HttpTeacher
from tests.helpers import swap_token_ids

from .conftest import PROMPTS, finish, metrics, start_train, write_spec

pytestmark = pytest.mark.multiproc


def _curve(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["branch"], r["loss"]) for r in rows]


def test_megatron_checkpoint_served_like_hf_model(tiny, teacher_ckpt, replicas):
    """Both replicas serve the converted checkpoint; log-probs and top-k equal the HF model's, and the tokenizer
    fingerprint equals the one the HF scorer (and so the student-side check) computes."""
    hf = load_scorer(str(tiny / "teacher_general"))
    seqs = [[1, 40, 41, 42, 43, 44, 2], [1, 50, 60, 70], list(range(3, 40))]
    starts = [2, 1, 10]
    ref = hf.score(seqs, 4)
    for rep in replicas:
        with HttpTeacher("general", [rep.url]) as client:
            info = client.model_info(rep.url)
            assert info["tokenizer_fingerprint"] == hf.model_info()["tokenizer_fingerprint"]
            assert info["model_path"].endswith("iter_0000000") and info["vocab_size"] == hf.vocab_size()
            got = client.score_batch(seqs, starts, top_k=4)
        for g, r, st in zip(got, ref, starts):
            torch.testing.assert_close(g.logprobs, r.logprobs[st - 1 :], atol=1e-5, rtol=0)
            torch.testing.assert_close(g.topk_logprobs, r.topk_logprobs[st - 1 :], atol=1e-5, rtol=0)
            assert torch.equal(g.topk_ids, r.topk_ids[st - 1 :])


def test_checkpoint_kind(tiny, teacher_ckpt, tmp_path):
    assert checkpoint_kind(tiny / "teacher_general") == "hf"
    assert checkpoint_kind(teacher_ckpt) == "megatron"
    assert checkpoint_kind(teacher_ckpt / "iter_0000000") == "megatron"
    with pytest.raises(CheckpointError, match="neither a HuggingFace checkpoint"):
        checkpoint_kind(tmp_path)


def test_teacher_with_other_tokenizer_refused_at_start(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = swap_token_ids(tiny / "tokenizer", tmp_path / "other_tok")
    model = AutoModelForCausalLM.from_pretrained(tiny / "teacher_general", dtype=torch.float32)
    scorer = HFScorer(model, AutoTokenizer.from_pretrained(tok_dir), str(tiny / "teacher_general"), str(tok_dir))
    with ServerThread(scorer) as srv:
        spec = write_spec(
            tiny,
            tmp_path / "ck",
            {"general": {"urls": [srv.url]}, "domain": {"urls": [srv.url]}},
            tmp_path / "spec.yaml",
        )
        proc = start_train(spec, tmp_path / "train.log")
        rc = finish(proc, tmp_path / "train.log", timeout_s=240)
    out = (tmp_path / "train.log").read_text()
    assert rc == 2, out[-3000:]
    assert re.search(
        r"camopd train: error: teacher (general|domain) at http://\S+: tokenizer differs from the "
        r"student's \(fingerprint",
        out,
    ), out[-3000:]
    assert not metrics(tmp_path / "ck")  # refused before any training step


class NaNScorer:
    """A real scorer that answers NaN for some chat sequences (those whose id sum is even)."""

    def __init__(self, inner: HFScorer, im_start: int) -> None:
        self.inner, self.im_start = inner, im_start
        self.poisoned: set[tuple[int, ...]] = set()

    def _poison(self, seq: list[int]) -> bool:
        return seq.count(self.im_start) >= 2 and sum(seq) % 2 == 0  # probes never hold two <|im_start|>

    def score(self, seqs: list[list[int]], top_k: int | None) -> list[TeacherScores]:
        out = self.inner.score(seqs, top_k)
        for seq, sc in zip(seqs, out):
            if self._poison(seq):
                self.poisoned.add(tuple(seq))
                sc.logprobs[-1] = float("nan")
        return out

    def vocab_size(self) -> int:
        return self.inner.vocab_size()

    def token_texts(self, ids: list[int]) -> list[str | None]:
        return self.inner.token_texts(ids)

    def model_info(self) -> dict:
        return self.inner.model_info()


def test_nan_from_teacher_drops_and_counts_sample(tiny, tmp_path):
    inner = load_scorer(str(tiny / "teacher_general"))
    scorer = NaNScorer(inner, im_start=inner.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    with ServerThread(scorer) as srv:
        teacher = {"urls": [srv.url], "retries": 1}
        spec = write_spec(
            tiny, tmp_path / "ck", {"general": teacher, "domain": teacher}, tmp_path / "spec.yaml", steps=2
        )
        proc = start_train(spec, tmp_path / "train.log")
        rc = finish(proc, tmp_path / "train.log")
    assert rc == 0, (tmp_path / "train.log").read_text()[-4000:]
    rows = metrics(tmp_path / "ck")
    assert len(rows) == 2
    for r in rows:
        assert r["n_samples"] == PROMPTS and r["n_nan_dropped"] == r["teacher_failed"], r
    failed = sum(r["teacher_failed"] for r in rows)
    assert failed == len(scorer.poisoned) > 0  # every NaN-scored sample counted once, none lost
    assert failed < 2 * PROMPTS and all(r["loss"] == r["loss"] for r in rows if r["teacher_failed"] < PROMPTS)
