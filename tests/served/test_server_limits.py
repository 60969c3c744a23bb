"""`camopd serve` is bounded against hostile requests: byte, token and JSON-depth caps, 4xx for every malformed
request, per-request timeouts, several workers with round-robin batching (a long request does not hold a short
one), and a bad `--host`/`--port` refused before the model loads. Real HTTP against real servers: in-process
(`ServerThread`, a transformers scorer, some slowed by a sleep per scored token so timings are clear on a loaded
machine) and a `camopd serve --backend megatron` subprocess (megatron-core scoring and sampling)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from megatron_camopd.serve.hf_scorer import load_scorer
from megatron_camopd.serve.server import ServerThread, start_local_replicas
from tests.helpers import ONE_LAYER_CONFIG, cli_argv, repo_env, tiny_hf_model

VOCAB, POSITIONS = 64, 256


def env() -> dict[str, str]:
    return repo_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 (64 tokens, 256 positions) as a HF dir, without a tokenizer (ids only)."""
    path = tmp_path_factory.mktemp("limits_qwen3")
    return tiny_hf_model(
        path, vocab_size=VOCAB, seed=0, max_position_embeddings=POSITIONS, eos_token_id=2, **ONE_LAYER_CONFIG
    )


@pytest.fixture(scope="module")
def scorer(hf_dir: Path):
    return load_scorer(str(hf_dir))


@pytest.fixture(scope="module")
def server(scorer):
    with ServerThread(scorer, max_body_bytes=1 << 20) as srv:
        yield srv


class SlowScorer:
    """The real scorer, after sleeping `per_token` seconds per scored token (a model that is slow on long input)."""

    def __init__(self, inner, per_token: float):
        self.inner, self.per_token = inner, per_token

    def score(self, seqs, top_k):
        time.sleep(self.per_token * sum(len(s) for s in seqs))
        return self.inner.score(seqs, top_k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def post(
    url: str,
    body: Any = None,
    raw: bytes | None = None,
    ctype: str | None = "application/json",
    path: str = "/generate",
    timeout: float = 60,
) -> tuple[int, Any, float]:
    """(status, JSON answer or text, seconds) of one POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST")
    if ctype is not None:
        req.add_header("Content-Type", ctype)
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    try:
        return status, json.loads(text), time.monotonic() - t0
    except ValueError:
        return status, text.decode(errors="replace"), time.monotonic() - t0


def score_body(ids: list, start: int = 0) -> dict:
    return {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": start,
    }


def message(out: Any) -> str:
    return out["error"]["message"] if isinstance(out, dict) and "error" in out else str(out)


def healthy(url: str) -> bool:
    for path in ("/health", "/health_generate"):
        with urllib.request.urlopen(url + path, timeout=30) as resp:
            if resp.status != 200:
                return False
    status, out, _ = post(url, score_body([5, 6, 7]))
    return status == 200 and [e[1] for e in out["meta_info"]["input_token_logprobs"]] == [5, 6, 7]


# ----------------------------------------------------------------------------------------- caps


def test_huge_prompt_is_refused_at_once_naming_the_limit(server):
    status, out, seconds = post(server.url, score_body([1] * 100_000))
    assert status == 400 and seconds < 5, (status, seconds)
    assert "input_ids" in message(out) and f"({POSITIONS} tokens)" in message(out)
    status, out, _ = post(server.url, score_body([1] * POSITIONS))  # one position too many
    assert status == 400 and str(POSITIONS) in message(out)
    status, out, _ = post(server.url, score_body([1] * (POSITIONS - 6)))  # past SGLang's max_req_input_len
    assert status == 400 and f"({POSITIONS - 6} tokens)" in message(out), out
    assert post(server.url, score_body([1] * (POSITIONS - 7)))[0] == 200  # the longest legal input


def test_body_over_the_byte_cap_is_413(server):
    raw = json.dumps(score_body([1] * 200_000)).encode()  # a legal body, padded to one byte over the 1 MiB cap
    raw = raw + b" " * ((1 << 20) + 1 - len(raw))
    status, out, _ = post(server.url, raw=raw)
    assert status == 413 and "--max-body-bytes" in message(out), (status, out)
    assert healthy(server.url)


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_json_is_400(server, depth):
    raw = b'{"input_ids": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    status, out, _ = post(server.url, raw=raw)
    assert status == 400 and "nested deeper than 32" in message(out), (status, out)
    # the control endpoints are guarded too (they decode their own bodies)
    status, out, _ = post(server.url, raw=b"[" * depth + b"]" * depth, path="/update_weight_version")
    assert status == 400 and "nested deeper" in message(out)


BAD = [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"not json", "malformed JSON"),
    (b"\xff\xfe{", "malformed JSON"),
    (b'{"input_ids": [1, 2]', "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b"null", "JSON object"),
    (b"42", "JSON object"),
    (b"{}", "input_ids"),
    (b'{"input_ids": null}', "input_ids"),
    (b'{"input_ids": 5}', "input_ids"),
    (b'{"input_ids": "1 2"}', "input_ids"),
    (b'{"input_ids": {"a": 1}}', "input_ids"),
    (b'{"input_ids": []}', "non-empty"),
    (b'{"input_ids": [1, 2.5]}', "input_ids[1]"),
    (b'{"input_ids": [1, "2"]}', "input_ids[1]"),
    (b'{"input_ids": [1, true]}', "input_ids[1]"),
    (b'{"input_ids": [1, 64]}', "[0, 64)"),
    (b'{"input_ids": [1, -1]}', "[0, 64)"),
    (b'{"input_ids": [1, 1e400]}', "input_ids[1]"),
    (b'{"input_ids": [1, ' + b"9" * 5000 + b"]}", "malformed JSON"),
    (b'{"input_ids": [1, NaN]}', "NaN"),
    (b'{"input_ids": [1, 2], "logprob_start_len": Infinity}', "Infinity"),
    (b'{"input_ids": [[1, 2], [[3]]]}', "input_ids[1]"),
    (b'{"input_ids": [[1, 2], 3]}', "input_ids"),
    (b'{"input_ids": [[1, 2], []]}', "input_ids[1]"),
    (b'{"input_ids": [[1, 2], [3, 4]], "sampling_params": [{"max_new_tokens": 0}]}', "sampling_params"),
    (b'{"input_ids": [1, 2], "sampling_params": [{"max_new_tokens": 0}]}', "sampling_params"),
    (b'{"input_ids": [1, 2], "sampling_params": 7}', "sampling_params"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}', "max_new_tokens"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1e30}}', "max_new_tokens"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 100000000000000000000}}', "max_new_tokens"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0, "temperature": -1}}', "temperature"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0, "top_p": 0}}', "top_p"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0, "top_k": 0}}', "top_k"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0, "sampling_seed": -1}}', "sampling_seed"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0, "stop_token_ids": [99]}}', "stop_token_ids"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0, "bogus": 1}}', "bogus"),
    (b'{"input_ids": [1, 2], "return_logprob": 1}', "return_logprob"),
    (b'{"input_ids": [1, 2], "logprob_start_len": 5}', "logprob_start_len"),
    (b'{"input_ids": [1, 2], "logprob_start_len": -2}', "logprob_start_len"),
    (b'{"input_ids": [1, 2], "top_logprobs_num": 1000000000}', "top_logprobs_num"),
    (b'{"input_ids": [1, 2], "top_logprobs_num": "3"}', "top_logprobs_num"),
    (b'{"input_ids": [1, 2], "stream": true}', "stream"),
    (b'{"input_ids": [1, 2], "bogus": 1}', "bogus"),
    (b'{"text": "hi"}', "tokenizer"),
    (b'{"text": "hi", "input_ids": [1, 2]}', "exactly one"),
]


@pytest.mark.parametrize("raw, needle", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_requests_are_4xx_naming_the_fault(server, raw, needle):
    status, out, _ = post(server.url, raw=raw)
    assert status == 400 and needle in message(out), (status, out)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_json_by_content_type_is_415(server, ctype):
    status, out, _ = post(server.url, score_body([1, 2]), ctype=ctype)
    assert status == 415 and "application/json" in message(out), (status, out)


def test_after_the_hostile_requests_the_server_is_healthy(server):
    assert healthy(server.url)
    assert 500 not in server.stats.errors and server.stats.errors[400] >= len(BAD)


# ----------------------------------------------------------------------------------------- workers, timeouts


def _race(url: str, long_body: dict, short_body: dict, delay: float) -> tuple[tuple, tuple]:
    """Send `long_body`, then after `delay` s `short_body` from a second client; both answers."""
    long_res: list[tuple] = []
    t = threading.Thread(target=lambda: long_res.append(post(url, long_body, timeout=120)))
    t.start()
    time.sleep(delay)
    short = post(url, short_body)
    t.join()
    return long_res[0], short


@pytest.mark.timeout(120)
def test_one_long_prompt_holds_one_worker_not_the_others(scorer):
    """2 workers: a 249-token prompt takes ~3 s (12 ms a token); a short request sent meanwhile is answered
    at once. (One worker, as before, answered it only after the long one.)"""
    with ServerThread(SlowScorer(scorer, 0.012), workers=2, max_wait_ms=1) as srv:
        (ls, lout, lsec), (ss, sout, ssec) = _race(
            srv.url, score_body(list(range(3, 63)) * 4 + [1] * 9), score_body([5, 6, 7]), delay=0.4
        )
        assert ls == 200 and ss == 200, (lout, sout)
        assert lsec > 2.5 and ssec < lsec / 3, (lsec, ssec)
        assert srv.stats.max_busy_workers == 2


@pytest.mark.timeout(120)
def test_a_request_of_many_prompts_interleaves_with_a_short_one(scorer):
    """1 worker, batches of 4: 40 prompts of 25 tokens (75 ms each, ~3 s in all); the short request from a second
    client is taken in the next batch (round-robin over requests), not after the 40."""
    with ServerThread(SlowScorer(scorer, 0.003), workers=1, max_batch=4, max_wait_ms=1) as srv:
        long_body = score_body([[4 + i % 50] * 25 for i in range(40)])
        (ls, lout, lsec), (ss, sout, ssec) = _race(srv.url, long_body, score_body([5, 6, 7]), delay=0.4)
        assert ls == 200 and ss == 200 and len(lout) == 40, sout
        assert lsec > 2.5 and ssec < lsec / 3, (lsec, ssec)


def test_answers_do_not_depend_on_the_worker_or_batch(scorer, server):
    """The same prompts answered alone, in one batch, and concurrently on two workers: identical numbers."""
    seqs = [[5, 9, 12, 3, 40, 41, 7], [1, 2, 3], [30, 31, 32, 33, 34, 35, 36, 37, 60]]
    alone = [post(server.url, {**score_body(s), "top_logprobs_num": 3})[1] for s in seqs]
    with ServerThread(scorer, workers=2, max_batch=1, max_wait_ms=0) as srv:
        res: list[Any] = [None] * 6
        threads = [
            threading.Thread(
                target=lambda i=i: res.__setitem__(
                    i, post(srv.url, {**score_body(seqs[i % 3]), "top_logprobs_num": 3})[1]
                )
            )
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, out in enumerate(res):
        want = alone[i % 3]["meta_info"]
        assert out["meta_info"]["input_token_logprobs"] == want["input_token_logprobs"]
        assert out["meta_info"]["input_top_logprobs"] == want["input_top_logprobs"]


@pytest.mark.timeout(120)
def test_a_request_past_its_timeout_gets_504_and_its_work_is_dropped(scorer):
    with ServerThread(SlowScorer(scorer, 0.003), workers=1, max_batch=2, max_wait_ms=1, request_timeout_s=1.0) as srv:
        status, out, seconds = post(srv.url, score_body([[4 + i % 50] * 25 for i in range(60)]))  # ~4.5 s of work
        assert status == 504 and "--request-timeout-s" in message(out), (status, out)
        assert seconds < 2.5, seconds
        status, _, short_s = post(srv.url, score_body([5, 6, 7]))  # the ~45 prompts left (3 s) were dropped
        assert status == 200 and short_s < 1.5, short_s
        assert srv.stats.timeouts == 1 and srv.stats.abandoned >= 30
        assert healthy(srv.url)


# ----------------------------------------------------------------------------------------- the command line


def test_bad_host_or_port_exits_2_with_a_message_before_loading(hf_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            ("--port", "99999"): "--port",
            ("--port", "abc"): "--port",
            ("--port", str(port)): "cannot listen",
            ("--host", "192.0.2.1"): "cannot listen",
            ("--context-length", "100000"): "256 positions",
            ("--workers", "0", "--request-timeout-s", "nan"): "--workers",
        }
        procs = {
            args: subprocess.Popen(
                cli_argv("serve", "--checkpoint", str(hf_dir), "--backend", "hf", *args),
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in cases
        }
        try:
            for args, proc in procs.items():
                try:
                    out, err = proc.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"camopd serve {args} did not exit") from None
                assert proc.returncode == 2, (args, out, err)
                assert cases[args] in err and "Traceback" not in out + err, (args, err)
                assert "listening" not in out, (args, out)
        finally:
            for proc in procs.values():  # a server that started anyway
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()


@pytest.fixture(scope="module")
def megatron_server(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`camopd serve --backend megatron` of the tiny model (scores and samples with megatron-core)."""
    rep = start_local_replicas(
        hf_dir,
        tmp_path_factory.mktemp("limits_replica"),
        1,
        env=env(),
        extra_args=("--backend", "megatron", "--workers", "2"),
    )[0]
    try:
        yield rep
    finally:
        rep.stop()


@pytest.mark.timeout(300)
def test_megatron_server_caps_prompts_and_outputs_at_the_context(megatron_server):
    url = megatron_server.url
    status, out, seconds = post(url, score_body([1] * 100_000))
    assert status == 400 and seconds < 5 and f"({POSITIONS} tokens)" in message(out), (status, seconds, out)
    sample = {"input_ids": [1] * 200, "sampling_params": {"max_new_tokens": 100, "temperature": 0}}
    status, out, _ = post(url, sample)
    assert status == 400 and "max_new_tokens" in message(out) and str(POSITIONS) in message(out), out
    for sp in (
        {"max_new_tokens": 4, "top_k": 10**20},
        {"max_new_tokens": 4, "temperature": 1e300},
        {"max_new_tokens": 4, "top_p": 1e-300, "sampling_seed": 2**64 - 1},
    ):
        status, out, _ = post(url, {"input_ids": [5, 6, 7], "sampling_params": sp})
        assert status in (200, 400), (sp, status, out)  # a legal extreme is sampled, an illegal one refused
        assert status != 200 or len(out["output_ids"]) <= 4
    for raw in (
        b"[" * 100_000,
        b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": NaN}}',
        b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4, "stop_token_ids": [1.5]}}',
    ):
        assert post(url, raw=raw)[0] == 400
    status, out, _ = post(url, {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert status == 200 and 1 <= len(out["output_ids"]) <= 4
    assert healthy(url)


@pytest.mark.timeout(300)
def test_megatron_workers_answer_concurrent_requests_as_sequential_ones(megatron_server):
    """Scoring and seeded sampling on two megatron-core workers at once: the numbers of one request at a time."""
    bodies = [
        {**score_body([5, 9, 12, 3, 40, 41, 7]), "top_logprobs_num": 2},
        {
            "input_ids": [9, 8, 7, 6],
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 7, "ignore_eos": True},
        },
    ]
    want = [post(megatron_server.url, b)[1] for b in bodies]
    res: list[Any] = [None] * 6
    threads = [
        threading.Thread(target=lambda i=i: res.__setitem__(i, post(megatron_server.url, bodies[i % 2])[1]))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in enumerate(res):
        ref = want[i % 2]
        assert out["output_ids"] == ref["output_ids"]
        for key in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs"):
            assert _close(out["meta_info"].get(key), ref["meta_info"].get(key)), key


def _close(a: Any, b: Any) -> bool:
    """Equal structures, floats within 1e-5 (a batch of several rows may round differently from a single row)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b
