"""The CPU teacher server speaks SGLang's /generate scoring subset: shapes, values, validation, endpoints."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
import torch

from megatron_camopd.serve.server import ServerThread
from megatron_camopd.teachers.protocol import build_request

from .conftest import direct_logprobs


def post(url: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"{url}{path}", timeout=30) as resp:
        return resp.status, resp.read()


@pytest.fixture(scope="module")
def server(scorer):
    with ServerThread(scorer, max_batch=8, max_wait_ms=20) as srv:
        yield srv


IDS = [5, 9, 12, 3, 40, 41, 7, 22, 8]


def test_logprobs_equal_direct_computation_and_entry0_is_null(server, scorer):
    status, out = post(server.url, build_request(IDS, None))
    assert status == 200
    meta = out["meta_info"]
    entries = meta["input_token_logprobs"]
    assert len(entries) == len(IDS)
    assert entries[0][0] is None and entries[0][1] == IDS[0]
    assert [e[1] for e in entries] == IDS
    got = torch.tensor([e[0] for e in entries[1:]])
    torch.testing.assert_close(got, direct_logprobs(scorer, IDS), atol=1e-5, rtol=1e-5)
    assert meta["prompt_tokens"] == len(IDS) and meta["completion_tokens"] == 0
    assert "input_top_logprobs" not in meta


def test_top_k_matches_full_distribution(server, scorer):
    k = 4
    status, out = post(server.url, build_request(IDS, k))
    assert status == 200
    top = out["meta_info"]["input_top_logprobs"]
    assert top[0] is None and len(top) == len(IDS)
    with torch.no_grad():
        logp = torch.log_softmax(scorer.model(input_ids=torch.tensor([IDS])).logits[0, :-1].float(), -1)
    for t in range(1, len(IDS)):
        ref = logp[t - 1].topk(k)
        assert [e[1] for e in top[t]] == ref.indices.tolist()
        torch.testing.assert_close(torch.tensor([e[0] for e in top[t]]), ref.values, atol=1e-5, rtol=1e-5)


def test_batched_input_ids_answered_in_order(server, scorer):
    seqs = [IDS, [1, 2], IDS[::-1], [30, 31, 32, 33]]  # different lengths exercise the padding
    status, out = post(server.url, build_request(seqs, 2))
    assert status == 200 and isinstance(out, list) and len(out) == len(seqs)
    for seq, obj in zip(seqs, out):
        entries = obj["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == seq
        torch.testing.assert_close(
            torch.tensor([e[0] for e in entries[1:]]), direct_logprobs(scorer, seq), atol=1e-5, rtol=1e-5
        )
        assert len(obj["meta_info"]["input_top_logprobs"]) == len(seq)


def test_concurrent_requests_are_batched_server_side(server, scorer):
    before = server.stats.batches, server.stats.sequences
    results: list[Any] = [None] * 8
    seqs = [[3 + i, 10 + i, 20 + i, 4] for i in range(8)]

    def worker(i: int) -> None:
        results[i] = post(server.url, build_request(seqs[i], None))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, (status, out) in zip(seqs, results):
        assert status == 200
        got = torch.tensor([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]])
        torch.testing.assert_close(got, direct_logprobs(scorer, seq), atol=1e-5, rtol=1e-5)
    batches = server.stats.batches - before[0]
    assert server.stats.sequences - before[1] == 8
    assert 1 <= batches < 8


def test_texts_in_logprobs(server, scorer):
    ids = scorer.tokenizer.encode("hi there", add_special_tokens=False)
    status, out = post(server.url, {**build_request(ids, None, with_text=True)})
    assert status == 200
    assert [e[2] for e in out["meta_info"]["input_token_logprobs"]] == list("hi there")


@pytest.mark.parametrize(
    "body, needle",
    [
        ({**build_request(IDS, None), "sampling_params": {"max_new_tokens": 8, "temperature": 1.0}}, "max_new_tokens"),
        ({**build_request(IDS, None), "sampling_params": {"temperature": 1.0}}, "max_new_tokens"),
        ({**build_request(IDS, None), "return_logprob": "yes"}, "return_logprob"),
        (build_request([1, 2, 64], None), "[0, 64)"),
        (build_request([], None), "non-empty"),
        (build_request([[1, 2], []], None), "input_ids[1]"),
        ({**build_request(IDS, None), "top_logprobs_num": -1}, "top_logprobs_num"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_requests_get_400_with_a_clear_message(server, body, needle):
    status, out = post(server.url, body)
    assert status == 400
    assert needle in out["error"]["message"]


def test_malformed_json_is_400(server):
    status, out = post(server.url, None, raw=b"{not json")
    assert status == 400 and "malformed JSON" in out["error"]["message"]


def test_health_and_model_info(server, tiny_ckpt):
    assert get(server.url, "/health")[0] == 200
    assert get(server.url, "/health_generate")[0] == 200
    status, raw = get(server.url, "/get_model_info")
    info = json.loads(raw)
    assert status == 200 and info["is_generation"] is True
    assert info["model_path"] == str(tiny_ckpt) and info["tokenizer_path"] == str(tiny_ckpt)
    assert info["tokenizer_fingerprint"].startswith("sha256:") and info["vocab_size"] == 64
