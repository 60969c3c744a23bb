"""check_tokenizer accepts a teacher with the student's tokenizer and refuses one whose tokenizer differs, both by
our fingerprint and, as against real SGLang (no fingerprint), by per-token texts."""

from __future__ import annotations

import pytest

from megatron_camopd.errors import TeacherError
from megatron_camopd.serve.hf_scorer import load_scorer
from megatron_camopd.serve.server import ServerThread
from megatron_camopd.teachers.http import HttpTeacher
from megatron_camopd.teachers.tokcheck import TokenizerInfo, check_tokenizer, default_probe_ids


class NoFingerprint:
    """Reports only model/tokenizer paths, like SGLang's /get_model_info."""

    def __init__(self, inner):
        self.inner = inner

    def model_info(self):
        return {"model_path": "m", "tokenizer_path": "t"}

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def other_scorer(other_tok_ckpt):
    return load_scorer(str(other_tok_ckpt))


@pytest.mark.parametrize("sglang_like", [False, True])
def test_same_tokenizer_accepted(scorer, sglang_like):
    served = NoFingerprint(scorer) if sglang_like else scorer
    student = TokenizerInfo.from_hf(scorer.tokenizer)
    with ServerThread(served) as srv, HttpTeacher("general", [srv.url]) as teacher:
        report = check_tokenizer(teacher, student, default_probe_ids(scorer.tokenizer))
    assert report.fingerprint_matched[srv.url] is (not sglang_like)
    assert report.tokens_compared[srv.url] > 50


@pytest.mark.parametrize("sglang_like", [False, True])
def test_different_tokenizer_refused(scorer, other_scorer, sglang_like):
    served = NoFingerprint(other_scorer) if sglang_like else other_scorer
    student = TokenizerInfo.from_hf(scorer.tokenizer)
    with ServerThread(served) as srv, HttpTeacher("domain", [srv.url]) as teacher:
        with pytest.raises(TeacherError, match="domain.*tokenizer differs") as err:
            check_tokenizer(teacher, student, default_probe_ids(scorer.tokenizer))
    assert ("fingerprint" in str(err.value)) is (not sglang_like)


def test_unverifiable_teacher_refused(scorer):
    student = TokenizerInfo.from_hf(scorer.tokenizer)
    with ServerThread(NoFingerprint(scorer)) as srv, HttpTeacher("general", [srv.url]) as teacher:
        with pytest.raises(TeacherError, match="cannot verify"):
            check_tokenizer(teacher, student, probe_ids=None)


def test_smaller_teacher_vocab_refused(scorer):
    student = TokenizerInfo.from_hf(scorer.tokenizer)
    student.vocab_size = 1000
    with ServerThread(scorer) as srv, HttpTeacher("general", [srv.url]) as teacher:
        with pytest.raises(TeacherError, match="vocabulary"):
            check_tokenizer(teacher, student, default_probe_ids(scorer.tokenizer))
