"""One contract for the two servers the project talks to: real SGLang 0.5.23 (`python -m sglang.launch_server` on
CPU, from the environment the project builds) and its CPU stand-in `camopd serve`, both serving the same tiny HF
student. Every test runs against both; a behaviour the client relies on that differs between them fails here.

What SGLang 0.5.23 does and the stand-in must do too: scoring answers from `logprob_start_len` on (first entry
empty) with transformers' log-probs; greedy samples with transformers' tokens; 400 for a control POST without a
JSON body, for an update outside a weight-update session, for a second session or an end without one, for an
input of context - 6 tokens or more and for prompt + max_new_tokens past the context, for an unknown sampling
parameter; no `/get_weight_version` (404; the version is in `/model_info`); `/health` waits while paused and
answers 503 after `SGLANG_HEALTH_CHECK_TIMEOUT`, while `/model_info` answers; `/ready` is 503 while paused, and
after such a failed health check until one succeeds (SGLang marks the server unhealthy: never probe a paused
server's `/health`).
The weight-update path (pause, begin, the trainer's group and queued broadcasts, end, continue; and from disk)
leaves the served model equal to the new weights and reports the version. The request fields the client sends
and the stand-in accepts are checked against SGLang's own request structs, read from its installed package.
"""

from __future__ import annotations

import gc
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from megatron_camopd.remote.replicas import ReplicaPool
from megatron_camopd.rollout import weight_sync as ws
from megatron_camopd.rollout.sampling import SamplingParams
from megatron_camopd.rollout.sglang_protocol import generate_request, parse_generation
from megatron_camopd.serve.server import LocalReplica, start_local_replicas
from megatron_camopd.serve.weights import CONTROL_FIELDS
from megatron_camopd.teachers.protocol import build_request, parse_scores, score_request
from tests.sglang_servers import SglangServer, start_sglang_servers

from .conftest import sub_env

CONTEXT = 256
HEALTH_TIMEOUT = 3  # SGLANG_HEALTH_CHECK_TIMEOUT of both servers (SGLang's default is 20 s)
IDS = [5, 17, 42, 9, 63, 2, 30, 11]


@pytest.fixture(scope="module", params=["sglang", "camopd"])
def server(request, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp(f"contract_{request.param}")
    env = {"SGLANG_HEALTH_CHECK_TIMEOUT": str(HEALTH_TIMEOUT)}
    handle: SglangServer | LocalReplica
    if request.param == "sglang":
        python = request.getfixturevalue("sglang_python")
        (handle,) = start_sglang_servers(python, [tiny / "student"], work, context_length=CONTEXT, env=env)
    else:
        extra = ("--context-length", str(CONTEXT))
        (handle,) = start_local_replicas(tiny / "student", work, 1, env={**sub_env(), **env}, extra_args=extra)
    try:
        yield handle.url
    finally:
        handle.stop()


def post(url: str, path: str, body: Any = None, timeout: float = 60.0) -> requests.Response:
    if body is None:
        return requests.post(url + path, timeout=timeout)
    return requests.post(url + path, json=body, timeout=timeout)


def hf_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log p(ids[i] | ids[:i]) for i >= 1."""
    from tests.helpers import hf_logits

    logp = torch.log_softmax(hf_logits(model_dir, torch.tensor([ids]))[0].double(), -1)
    return torch.stack([logp[i - 1, ids[i]] for i in range(1, len(ids))]).float()


# ----------------------------------------------------------------------------------------- scoring and sampling


def test_scores_from_the_response_start_equal_transformers(server: str, tiny: Path) -> None:
    start = 3
    body = score_request(IDS, start, top_k=4)
    assert body["logprob_start_len"] == start - 1
    ans = post(server, "/generate", body).json()
    assert len(ans["meta_info"]["input_token_logprobs"]) == len(IDS) - (start - 1)
    assert ans["meta_info"]["input_token_logprobs"][0][0] is None  # the first returned entry has no log-prob
    scores = parse_scores(ans, IDS, start, 4, "t", first=start - 1)
    want = hf_logprobs(tiny / "student", IDS)[start - 1 :]
    assert torch.allclose(scores.logprobs, want, atol=2e-5), (scores.logprobs, want)
    assert scores.topk_ids is not None and scores.topk_ids.shape == (len(IDS) - start, 4)
    full = parse_scores(post(server, "/generate", build_request(IDS, None)).json(), IDS, 1, None, "t")
    assert torch.allclose(full.logprobs[start - 1 :], scores.logprobs, atol=1e-5)


def test_a_prompts_samples_are_scored_from_its_cached_prefix(server: str, tiny: Path, request) -> None:
    """The teacher client sends a prompt's first sample alone, then its other samples to the same server: SGLang
    serves their prompt from its radix cache (`meta_info.cached_tokens`, up to `logprob_start_len`; the stand-in
    keeps no cache and reports none), and every score equals transformers'."""
    from megatron_camopd.teachers.http import HttpTeacher

    prompt = [(7 * i + 3) % 60 + 2 for i in range(40)]  # not asked by any other test: nothing cached yet
    samples = [prompt + [10 + k, 20 + k, 30 + k] for k in range(4)]
    with HttpTeacher("t", [server]) as teacher:
        scores = teacher.score_batch(samples, [len(prompt)] * len(samples))
        cached = teacher.prefix_cached_tokens
    for ids, got in zip(samples, scores, strict=True):
        want = hf_logprobs(tiny / "student", ids)[len(prompt) - 1 :]
        assert torch.allclose(got.logprobs, want, atol=2e-5), (got.logprobs, want)
    if request.node.callspec.params["server"] == "sglang":  # each of the 3 others: its whole prompt; the first: what
        # an earlier test left cached of it (a shared first token, say)
        assert 3 * (len(prompt) - 1) <= cached < 4 * (len(prompt) - 1), cached
    else:
        assert cached == 0


def test_greedy_generation_equals_transformers_and_answers_in_sglang_shape(server: str, tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0.0, max_new_tokens=6, greedy=True)
    ans = post(server, "/generate", generate_request(IDS, params, seed=7, max_new=6)).json()
    g = parse_generation(ans, max_new=6, stops={2}, vocab=102, where="t")
    model = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([IDS]), max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=3)
    assert g.tokens == out[0, len(IDS) :].tolist()
    logp = hf_logprobs(tiny / "student", IDS + g.tokens)[len(IDS) - 1 :]
    assert torch.allclose(torch.tensor(g.logprobs), logp, atol=2e-5)  # log mu at temperature 1
    assert ans["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert isinstance(ans["meta_info"]["weight_version"], str)


# ----------------------------------------------------------------------------------------- what both refuse


@pytest.mark.parametrize(
    "path", ["/pause_generation", "/continue_generation", "/begin_weight_update", "/end_weight_update"]
)
def test_control_posts_without_a_json_body_are_refused(server: str, path: str) -> None:
    assert post(server, path).status_code == 400


def test_updates_run_only_inside_one_weight_update_session(server: str) -> None:
    body = {"names": [], "dtypes": [], "shapes": [], "group_name": "none"}
    r = post(server, "/update_weights_from_distributed", body)
    assert r.status_code == 400 and "begin_weight_update" in r.json()["message"]
    assert post(server, "/end_weight_update", {}).status_code == 400  # no session open
    assert post(server, "/begin_weight_update", {}).status_code == 200
    assert post(server, "/begin_weight_update", {}).status_code == 400  # already open
    assert post(server, "/end_weight_update", {}).status_code == 200


@pytest.mark.parametrize(
    "n_input, max_new, ok",
    [
        (CONTEXT, 0, False),  # input as long as the context
        (CONTEXT - 6, 0, False),  # the scheduler's max_req_input_len = context - 6
        (CONTEXT - 7, 0, True),  # the longest input a server of this context takes
        (CONTEXT - 20, 21, False),  # prompt + max_new_tokens past the context
        (CONTEXT - 20, 20, True),  # ... exactly the context
    ],
)
def test_context_bounds(server: str, n_input: int, max_new: int, ok: bool) -> None:
    body = {"input_ids": [7] * n_input, "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0}}
    assert (post(server, "/generate", body).status_code == 200) == ok


def test_server_info_reports_the_limits_the_client_plans_with(server: str) -> None:
    from megatron_camopd.rollout.sglang_protocol import max_input_tokens, server_limits

    info = requests.get(server + "/server_info", timeout=30).json()
    assert server_limits(info) == (CONTEXT, max_input_tokens(CONTEXT))
    assert info["tp_size"] == info["dp_size"] == info["pp_size"] == 1


def test_unknown_sampling_parameter_is_refused(server: str) -> None:
    body = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 1, "bogus": 1}}
    assert post(server, "/generate", body).status_code == 400


def test_weight_version_is_in_model_info_not_its_own_endpoint(server: str) -> None:
    assert requests.get(server + "/get_weight_version", timeout=30).status_code == 404
    assert post(server, "/update_weight_version", {"new_version": "41"}).status_code == 200
    assert requests.get(server + "/model_info", timeout=30).json()["weight_version"] == "41"


def test_paused_server_fails_health_but_answers_model_info(server: str) -> None:
    assert post(server, "/pause_generation", {}).status_code == 200
    try:
        t0 = time.monotonic()
        assert requests.get(server + "/health", timeout=60).status_code == 503
        assert time.monotonic() - t0 >= HEALTH_TIMEOUT - 0.5  # it waited for the pause
        assert requests.get(server + "/model_info", timeout=30).status_code == 200
        assert requests.get(server + "/ready", timeout=30).status_code == 503
    finally:
        assert post(server, "/continue_generation", {}).status_code == 200
    # the failed health check marked the server unhealthy: /ready says so until a health check succeeds
    assert requests.get(server + "/ready", timeout=30).status_code == 503
    assert requests.get(server + "/health", timeout=60).status_code == 200
    assert requests.get(server + "/ready", timeout=30).status_code == 200


# ----------------------------------------------------------------------------------------- weight updates


def _scores(url: str) -> torch.Tensor:
    return parse_scores(post(url, "/generate", build_request(IDS, None)).json(), IDS, 1, None, "t").logprobs


def test_distributed_update_session_loads_the_new_weights(server: str, tiny: Path) -> None:
    from safetensors.torch import load_file

    new = load_file(str(tiny / "teacher_general" / "model.safetensors"))
    pool = ReplicaPool("contract", [server], timeout_s=60.0)
    sender = ws.DistributedSender("contract-g1", "gloo")
    try:
        deadline = ws.Deadline(120.0)
        sender.connect(pool, [server], {server: 1}, deadline)
        assert post(server, "/pause_generation", {}).status_code == 200
        assert post(server, "/begin_weight_update", {}).status_code == 200
        items = sorted(new.items())
        half = len(items) // 2
        sender.send(pool, items[:half], 9, False, deadline)  # no version and no flush before the last bucket
        assert requests.get(server + "/model_info", timeout=30).json()["weight_version"] != "9"
        sender.send(pool, items[half:], 9, True, deadline)
        assert post(server, "/end_weight_update", {}).status_code == 200
        assert post(server, "/continue_generation", {}).status_code == 200
        assert requests.get(server + "/model_info", timeout=30).json()["weight_version"] == "9"
        want = hf_logprobs(tiny / "teacher_general", IDS)
        assert torch.allclose(_scores(server), want, atol=2e-5)
    finally:
        sender.close(pool)
        pool.close()


def test_disk_update_loads_the_directory_and_sets_the_version(server: str, tiny: Path) -> None:
    body = {"model_path": str(tiny / "student"), "weight_version": "12", "flush_cache": True}
    r = post(server, "/update_weights_from_disk", body, timeout=300)
    assert r.status_code == 200 and r.json()["success"], r.text
    assert requests.get(server + "/model_info", timeout=30).json()["weight_version"] == "12"
    assert torch.allclose(_scores(server), hf_logprobs(tiny / "student", IDS), atol=2e-5)


def test_a_preemption_signal_ends_a_stuck_group_build_at_once(server: str) -> None:
    """A rendezvous that cannot complete (the group is told to expect a rank nobody brings) stops within the
    poll interval of the trainer's preemption flag, not after the store's timeout; the server is usable after."""
    pool = ReplicaPool("contract", [server], timeout_s=60.0)
    sender = ws.DistributedSender("contract-stuck", "gloo")
    flag = {"stop": False}
    deadline = ws.Deadline(8.0, lambda: flag["stop"])  # the store gives up after 8 s: the server is freed
    t0 = time.monotonic()
    import threading

    threading.Timer(2.0, lambda: flag.__setitem__("stop", True)).start()
    try:
        with pytest.raises(ws.SyncAborted) as err:
            sender.connect(pool, [server], {server: 2}, deadline)  # the server brings 1 rank, not 2
        assert err.value.preempted
        assert time.monotonic() - t0 < 10.0
    finally:
        pool.close()
    del err  # its traceback holds the trainer's store; the server's rendezvous ends when the store is gone
    gc.collect()
    ok = False
    for _ in range(120):  # the server's own rendezvous gives up once our store is gone
        try:
            ok = post(server, "/generate", build_request(IDS, None), timeout=5).status_code == 200
        except requests.RequestException:
            ok = False
        if ok:
            break
        time.sleep(1.0)
    assert ok, "the server does not answer after the aborted group build"


# ----------------------------------------------------------------------------------------- request fields


def _sglang_fields(python: Path) -> dict[str, list[str]]:
    script = """
import dataclasses, json, msgspec
from sglang.srt.managers import io_struct as io
from sglang.srt.sampling.sampling_params import SamplingParams
def f(cls):
    fs = msgspec.structs.fields(cls) if issubclass(cls, msgspec.Struct) else dataclasses.fields(cls)
    return sorted(x.name for x in fs)
names = {
    "/pause_generation": "PauseGenerationReqInput", "/continue_generation": "ContinueGenerationReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput", "/end_weight_update": "EndWeightUpdateReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/get_weights_by_name": "GetWeightsByNameReqInput",
}
out = {p: f(getattr(io, c)) for p, c in names.items()}
out["generate"] = f(io.GenerateReqInput)
out["sampling_params"] = f(SamplingParams)
print(json.dumps(out))
"""
    res = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_request_fields_are_sglangs_own(sglang_python: Path) -> None:
    from megatron_camopd.serve import generate_api

    theirs = _sglang_fields(sglang_python)
    for path, fields in CONTROL_FIELDS.items():  # the stand-in accepts exactly SGLang's fields
        assert sorted(fields) == theirs[path], path
    body = generate_request(IDS, SamplingParams(), seed=1, max_new=4)  # what the clients send
    assert set(body) <= set(theirs["generate"])
    assert set(body["sampling_params"]) <= set(theirs["sampling_params"])
    assert set(score_request(IDS, 2, 4)) <= set(theirs["generate"])
    known = generate_api._SUPPORTED | generate_api._INERT | set(generate_api._UNSUPPORTED)
    assert known <= set(theirs["generate"])  # the stand-in knows no field SGLang does not have
    sampling = generate_api._SAMPLING_SUPPORTED | set(generate_api._SAMPLING_UNSUPPORTED)
    assert sampling <= set(theirs["sampling_params"])
