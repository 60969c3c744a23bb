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


class ClippingSGLang:
    """An SGLang-like teacher client: its server echoes ids >= vocab_size - 1 as 0 (SGLang's scheduler clip) and
    reports only model/tokenizer paths; `probe` checks the answer with the real protocol code, as HttpTeacher."""

    name = "llama3"

    def __init__(self, tokenizer, vocab_size: int, model_path: str = "m", wrong_id: int | None = None):
        self.tokenizer, self.vocab, self.model_path, self.wrong_id = tokenizer, vocab_size, model_path, wrong_id
        self.echo_vocab_size = None

    def live_urls(self):
        return ["http://sglang:30000"]

    def model_info(self, url=None):
        return {"model_path": self.model_path, "tokenizer_path": "t"}

    def answer(self, ids):
        echoed = [i if i < self.vocab - 1 else 0 for i in ids]
        if self.wrong_id is not None and len(echoed) > 2:
            echoed[1] = self.wrong_id
        entries = [[None if k == 0 else -1.0, e, self.tokenizer.decode([e])] for k, e in enumerate(echoed)]
        return {"meta_info": {"input_token_logprobs": entries}}

    def probe(self, ids, url=None, vocab_size=None):
        from megatron_camopd.teachers.protocol import parse_meta

        return parse_meta(self.answer(ids), ids, None, f"teacher {self.name} probe", vocab_size)[1]


def test_sglang_echo_clip_of_the_last_id_is_tolerated(scorer):
    """Llama-3: vocab_size == len(tokenizer), so the probe's last id comes back as 0; that is not a mismatch."""
    tok = scorer.tokenizer
    student = TokenizerInfo.from_hf(tok)
    last = len(tok) - 1
    probes = default_probe_ids(tok) + [[1, 2, last]]
    assert any(last in p for p in probes)
    teacher = ClippingSGLang(tok, vocab_size=len(tok))
    report = check_tokenizer(teacher, student, probes)
    assert report.tokens_compared["http://sglang:30000"] > 50 and teacher.echo_vocab_size == len(tok)
    with pytest.raises(TeacherError, match="echoes token id 5, we sent"):  # a real mismatch still fails
        check_tokenizer(ClippingSGLang(tok, vocab_size=len(tok), wrong_id=5), student, [[1, 2, 3]])


def test_served_vocab_size_from_the_model_config(scorer, tmp_path):
    import json

    from megatron_camopd.teachers.tokcheck import served_vocab_size

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 4242}))
    assert served_vocab_size({"model_path": str(tmp_path)}, 7) == 4242
    assert served_vocab_size({"vocab_size": 99, "model_path": str(tmp_path)}, 7) == 99
    assert served_vocab_size({"model_path": "/nonexistent"}, 7) == 7


def test_scoring_response_check_tolerates_the_clip_only_with_the_vocab_size():
    from megatron_camopd.teachers.protocol import parse_scores

    ids = [5, 127, 3, 128]  # vocab_size 128: SGLang echoes ids >= 127 as 0
    answer = {
        "meta_info": {"input_token_logprobs": [[None, 5, None], [-1.0, 0, None], [-2.0, 3, None], [-0.5, 0, None]]}
    }
    scores = parse_scores(answer, ids, 2, None, "teacher t", vocab_size=128)
    assert scores.logprobs.tolist() == [-2.0, -0.5]
    with pytest.raises(TeacherError, match="entry 1 echoes token id 0, we sent 127"):
        parse_scores(answer, ids, 2, None, "teacher t")
    bad = {"meta_info": {"input_token_logprobs": [[None, 5, None], [-1.0, 0, None], [-2.0, 0, None], [-0.5, 0, None]]}}
    with pytest.raises(TeacherError, match="entry 2 echoes token id 0, we sent 3"):  # 3 is not clipped
        parse_scores(bad, ids, 2, None, "teacher t", vocab_size=128)


def test_http_teacher_scoring_tolerates_the_clip_after_the_check():
    """Over real HTTP: an SGLang-like /generate that echoes ids >= vocab_size - 1 as 0. HttpTeacher's scoring
    refuses the echo until the tokenizer check has set the served vocab_size, then accepts it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    vocab = 64

    class Clipping(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = req["input_ids"]
            entries = [[None if k == 0 else -0.25 * k, i if i < vocab - 1 else 0, None] for k, i in enumerate(ids)]
            body = json.dumps(
                {"text": "", "meta_info": {"input_token_logprobs": entries, "output_token_logprobs": []}}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Clipping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with HttpTeacher("t", urls=[url], retries=0, timeout_s=10.0) as teacher:
            ids = [3, 63, 5, 63]
            with pytest.raises(TeacherError, match="echoes token id 0, we sent 63"):
                teacher.score_batch([ids], [1])
            teacher.echo_vocab_size = vocab
            [scores] = teacher.score_batch([ids], [1])
            assert scores.logprobs.tolist() == [-0.25, -0.5, -0.75]
    finally:
        server.shutdown()
