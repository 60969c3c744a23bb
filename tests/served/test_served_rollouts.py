"""The `sglang` rollout engine against `camopd serve` subprocesses of the tiny student (port 0, real HTTP, real
gloo) and against real SGLang 0.5.23 servers: served rollouts of `camopd serve` equal the in-process megatron
engine's for the same seeds (real SGLang honours no seed on a CPU: its tests are greedy); after an optimizer
step both weight-sync paths (`distributed`, `disk`) leave every server, of either kind, with the trainer's
weights (every HF tensor, bit for bit in fp32), reporting the trainer's version and sampling with them; the
staleness bound drops or stops as documented on served rollouts; malformed requests get a 400 naming the field,
never a hang; batched, text and paused requests are answered as SGLang answers them; `camopd train` with
`rollout.engine: sglang` over two real SGLang servers (both sync paths) gives the in-process loss curve and logs
the sync; a real server killed mid-rollout loses no sample.

The student servers are shared by the session (`student_replicas`); every helper that samples first syncs its
trainer's weights, so the tests do not depend on what an earlier one left on the servers. The failover test
kills a server of its own."""

from __future__ import annotations

import dataclasses
import json
import math
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from megatron_camopd.backend.spawn import run_on_ranks
from megatron_camopd.errors import RolloutError
from megatron_camopd.rollout.collect import NOT_SCORED, Sample, _unscorable
from megatron_camopd.rollout.sampling import SamplingParams
from megatron_camopd.rollout.staleness import STALE_KEY, fail_if_stale, lag_of, stale_counts

from . import _rollout_workers as w
from .conftest import STEPS, finish, in_process_teachers, metrics, served_rollouts, start_train, write_spec

pytestmark = pytest.mark.multiproc

STOPS = tuple(range(40, 48))  # a few % of the tiny student's mass: rows stop at different steps
PARAMS = [
    SamplingParams(greedy=True, max_new_tokens=12),
    SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=STOPS),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=12, stop_token_ids=STOPS),
]


def assert_same_tokens(served, ref, lp_atol=1e-4):
    """Same response ids, top-1 and finish reason per sample; rollout log-probs equal up to float rounding."""
    assert len(served) == len(ref)
    for i, ((ids, lp, top1, why, _), (ids0, lp0, top10, why0, _)) in enumerate(zip(served, ref)):
        assert ids == ids0, f"sample {i}: served {ids} vs in-process {ids0}"
        assert why == why0 and torch.equal(top1, top10), i
        torch.testing.assert_close(lp, lp0, atol=lp_atol, rtol=0)


@pytest.fixture(scope="module")
def urls(student_replicas) -> list[str]:
    return [r.url for r in student_replicas]


@pytest.fixture(scope="module")
def served_run(tiny, urls) -> dict:
    (out,) = run_on_ranks(w.served_vs_in_process, 1, str(tiny / "student"), urls, PARAMS)
    return out


def test_served_rollouts_equal_in_process(served_run, urls):
    """Greedy identical, sampled (two settings) the same tokens; both servers answered; sampling really sampled."""
    for served, ref in zip(served_run["served"], served_run["ref"]):
        assert_same_tokens(served, ref)
    assert served_run["servers"] == sorted(urls)
    greedy, sampled = served_run["served"][0], served_run["served"][1]
    assert any(g[0] != s[0] for g, s in zip(greedy, sampled))
    assert {s[3] for per in served_run["served"][1:] for s in per} == {"stop", "length"}
    for rollouts in served_run["rollouts"]:
        assert {r.meta["weight_version"] for r in rollouts} == {"0"}  # the trainer's weights synced first
        assert all(r.entropy is None for r in rollouts)  # SGLang returns none; not asked for here


def _samples(rollouts) -> list[Sample]:
    return [
        Sample(
            index=i,
            group=i,
            branch="all",
            prompt=SimpleNamespace(prompt_ids=r.prompt_ids),
            teacher="t",
            verifier=None,
            rollout=r,
        )
        for i, r in enumerate(rollouts)
    ]


def _bound(max_staleness: int, on_stale: str):
    return SimpleNamespace(max_staleness=max_staleness, on_stale=on_stale)


def test_staleness_drop_and_error(served_run):
    """Rollouts sampled with weight version 0 (from the servers), judged at later trainer steps."""
    rollouts = served_run["rollouts"][1]
    n = len(rollouts)
    # current: used, lag 0, nothing counted as stale
    samples = _samples(rollouts)
    assert not any(_unscorable(s, 0, _bound(0, "drop")) for s in samples)
    assert [s.meta["stale_lag"] for s in samples] == [0] * n
    assert stale_counts(samples) == {"stale_samples": 0.0, "stale_dropped": 0.0}
    fail_if_stale(samples, 0, 0)
    # two steps behind, allowed two: used (the IS weight corrects), counted
    samples = _samples(rollouts)
    assert not any(_unscorable(s, 2, _bound(2, "drop")) for s in samples)
    assert stale_counts(samples) == {"stale_samples": float(n), "stale_dropped": 0.0}
    fail_if_stale(samples, 2, 2)
    # two behind, allowed one, drop: every sample kept unscored with its reason, counted as dropped
    samples = _samples(rollouts)
    assert all(_unscorable(s, 2, _bound(1, "drop")) for s in samples)
    for s in samples:
        assert s.meta[NOT_SCORED] == "stale" and s.error == s.meta[STALE_KEY]
        assert "weight_version '0'" in s.error and "step 2" in s.error and s.rollout.meta["server"] in s.error
    assert stale_counts(samples) == {"stale_samples": 0.0, "stale_dropped": float(n)}
    # two behind, allowed one, error: collect_step leaves them scored, then the batch check stops the run
    samples = _samples(rollouts)
    assert not any(_unscorable(s, 2, _bound(1, "error")) for s in samples)
    with pytest.raises(RolloutError, match=r"sample 0 .*max_staleness = 1.*on_stale: drop"):
        fail_if_stale(samples, 2, 1)
    # a server on its launch weights ("default") is beyond any bound; in-process rollouts are never stale
    r = rollouts[0]
    launch = dataclasses.replace(r, meta={**r.meta, "weight_version": "default"})
    with pytest.raises(RolloutError, match="'default'"):
        fail_if_stale(_samples([launch]), 0, 1000)
    assert lag_of(dataclasses.replace(r, meta={"engine": "megatron"}), 5) is None


@pytest.mark.parametrize("server", ["camopd", "sglang"])
@pytest.mark.parametrize("mode", ["distributed", "disk"])
def test_weight_sync_makes_servers_equal_trainer(tiny, request, server, mode, tmp_path):
    """Two rounds of rollout -> SFT step -> sync, on `camopd serve` and on real SGLang 0.5.23 (greedy there): every HF
    tensor on every server equals the trainer's after each sync (camopd serve: read back bit for bit; SGLang's
    Qwen3 cannot read a weight back: the scores of a probe equal transformers' with the trainer's weights), the
    step did change them, every server's `/model_info` reports the trainer's version, and the next round's served
    rollouts (version 1) equal the in-process engine's on the updated weights, entropies (computed in process)
    included."""
    urls = request.getfixturevalue("urls" if server == "camopd" else "sglang_students")
    sync_dir = tmp_path / "weights"
    greedy = server == "sglang"
    (out,) = run_on_ranks(w.sync_steps, 1, str(tiny / "student"), urls, mode, str(sync_dir), 2, greedy)
    rounds = out["rounds"]
    for step, rnd in enumerate(rounds):
        assert rnd["versions"] == [str(step)] * len(rnd["versions"])
        assert rnd["reported"] == [str(step + 1)] * len(urls)  # after the sync of step + 1
        assert_same_tokens(rnd["served"], rnd["ref"])
        for served, ref in zip(rnd["served"], rnd["ref"]):  # asked for: one forward pass in process
            torch.testing.assert_close(served[4], ref[4], atol=1e-4, rtol=0)
        if server == "camopd":  # every HF tensor, bit for bit
            assert rnd["unequal"] == {u: [] for u in urls}, rnd["unequal"]
        else:  # SGLang's Qwen3 has no get_weights_by_name: its scores are the trainer's weights' (fp32)
            assert max(rnd["score_diff"].values()) < 2e-5, rnd["score_diff"]
        assert rnd["n_tensors"] > 10 and rnd["changed"], "the optimizer step changed nothing: the test proves nothing"
        sync = rnd["sync"]
        assert sync["weight_sync_servers"] == 2 and sync["weight_sync_tries"] == 1 and sync["weight_sync_bytes"] > 0
    assert len(rounds[1]["changed"]) >= len(rounds[0]["changed"])
    if mode == "disk":
        assert sorted(p.name for p in sync_dir.iterdir()) == ["step_00000002"]  # older versions removed
        loaded = sync_dir / "step_00000002"
        assert (loaded / "config.json").is_file() and (loaded / "model.safetensors.index.json").is_file()


def _post(url: str, path: str, body: bytes | dict, timeout: float = 30.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _message(answer: dict) -> str:
    return answer["error"]["message"] if "error" in answer else answer["message"]


def _gen(**over) -> dict:
    sp = {"max_new_tokens": 4, "temperature": 1.0, "sampling_seed": 3, **over.pop("sampling_params", {})}
    return {"input_ids": [5, 6, 7], "sampling_params": sp, "return_logprob": True, "top_logprobs_num": 1, **over}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", b'{"input_ids": [5, 6', "malformed JSON"),
        ("/generate", b"[1, 2]", "JSON object"),
        ("/generate", _gen(sampling_params={"temperature": "hot"}), "temperature"),
        ("/generate", _gen(sampling_params={"max_new_tokens": -2}), "max_new_tokens"),
        ("/generate", _gen(sampling_params={"max_new_tokens": 10**6}), "max_new_tokens"),
        ("/generate", _gen(sampling_params={"frequency_penalty": 0.5}), "frequency_penalty"),
        ("/generate", _gen(input_ids=[5, 10**7]), "input_ids"),
        ("/generate", _gen(bogus_field=1), "bogus_field"),
        (
            "/update_weights_from_distributed",
            {"names": ["x"], "dtypes": ["float32"], "shapes": [[2]], "group_name": "no-such-group"},
            "begin_weight_update",  # outside a weight-update session (SGLang 0.5.23 checks that first)
        ),
        ("/init_weights_update_group", {"master_address": "127.0.0.1"}, "master_port"),
        ("/update_weights_from_disk", {"model_path": "/nonexistent/dir"}, "model_path"),
        ("/pause_generation", {"mode": "sideways"}, "mode"),
    ],
)
def test_malformed_request_gets_4xx(urls, path, body, field):
    status, answer = _post(urls[0], path, body)
    assert 400 <= status < 500, (status, answer)
    assert field in _message(answer), answer


def test_server_still_serves_after_bad_requests(urls):
    status, answer = _post(urls[0], "/generate", _gen())
    assert status == 200 and len(answer["output_ids"]) >= 1
    assert answer["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert len(answer["meta_info"]["output_token_logprobs"]) == len(answer["output_ids"])


def test_sampling_answers_in_sglang_shape(urls):
    """A batched request (one sampling_params per prompt) answers each prompt as its own request would (same
    seeds); a text prompt is tokenized; the answer has SGLang's fields, one log-prob entry per output id."""
    single = [
        _post(urls[0], "/generate", _gen(input_ids=ids, sampling_params={"sampling_seed": seed}))[1]
        for ids, seed in (([5, 6, 7], 11), ([9, 8, 7, 6, 5], 12))
    ]
    status, batch = _post(
        urls[0],
        "/generate",
        {
            "input_ids": [[5, 6, 7], [9, 8, 7, 6, 5]],
            "return_logprob": True,
            "top_logprobs_num": 1,
            "sampling_params": [
                {"max_new_tokens": 4, "temperature": 1.0, "sampling_seed": 11},
                {"max_new_tokens": 4, "temperature": 1.0, "sampling_seed": 12},
            ],
        },
    )
    assert status == 200 and isinstance(batch, list) and len(batch) == 2
    for got, want in zip(batch, single):
        assert got["output_ids"] == want["output_ids"]
        meta = got["meta_info"]
        assert [e[1] for e in meta["output_token_logprobs"]] == got["output_ids"]
        assert [len(row) for row in meta["output_top_logprobs"]] == [1] * len(got["output_ids"])
        assert meta["weight_version"] == want["meta_info"]["weight_version"]
        assert meta["finish_reason"]["type"] in ("stop", "length")
        assert meta["completion_tokens"] == len(got["output_ids"])
    status, text = _post(
        urls[1], "/generate", {"text": "2+3=", "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    )
    assert status == 200 and isinstance(text["text"], str) and 1 <= len(text["output_ids"]) <= 3
    assert text["meta_info"]["prompt_tokens"] >= 2


def test_pause_holds_generation_and_abort_answers_it(urls):
    """While paused (in_place) a request waits; a pause with mode abort answers it with finish_reason abort
    (the client retries such a sample elsewhere); after /continue_generation requests are served again."""
    from concurrent.futures import ThreadPoolExecutor

    url = urls[1]
    with ThreadPoolExecutor(1) as pool:
        try:
            assert _post(url, "/pause_generation", {"mode": "in_place"})[0] == 200
            waiting = pool.submit(_post, url, "/generate", _gen())
            with pytest.raises(TimeoutError):
                waiting.result(timeout=1.5)
            assert _post(url, "/pause_generation", {"mode": "abort"})[0] == 200
            status, answer = waiting.result(timeout=30)
            assert status == 200 and answer["meta_info"]["finish_reason"]["type"] == "abort", answer
        finally:
            assert _post(url, "/continue_generation", {})[0] == 200
    status, answer = _post(url, "/generate", _gen())
    assert status == 200 and answer["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_train_with_sglang_engine_matches_in_process(tiny, sglang_students, tmp_path):
    """`camopd train` with `rollout.engine: sglang` over two real SGLang 0.5.23 servers of the student, weights
    synced after every step over gloo and (a second run) through the disk (default `<checkpoint.dir>/weights`),
    against the same spec with the in-process megatron engine, greedy: losses within 1e-4 (measured: ~3e-7), every
    sample used, every sample's server-reported version the trainer's (staleness 0). The served runs go one after
    the other (they share the servers)."""
    urls = sglang_students
    ref_dir = tmp_path / "ref"
    ref_spec = write_spec(tiny, ref_dir, in_process_teachers(tiny), tmp_path / "ref.yaml", greedy=True)
    ref = start_train(ref_spec, tmp_path / "ref.log")
    served = {}
    for mode in ("distributed", "disk"):
        out = tmp_path / mode
        spec = served_rollouts(
            write_spec(tiny, out, in_process_teachers(tiny), tmp_path / f"{mode}.yaml", greedy=True),
            urls,
            weight_sync=mode,
        )
        log = tmp_path / f"{mode}.log"
        assert finish(start_train(spec, log), log) == 0, log.read_text()[-4000:]
        served[mode] = metrics(out)
    assert finish(ref, tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()[-4000:]
    ref_rows = metrics(ref_dir)
    assert sorted(p.name for p in (tmp_path / "disk" / "weights").iterdir()) == [f"step_{STEPS:08d}"]
    for mode, rows in served.items():
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), mode
        for r, want in zip(rows, ref_rows, strict=True):
            assert r["weight_sync_servers"] == 2 and r["weight_sync_s"] > 0 and r["weight_sync_bytes"] > 0, r
            assert r.get("rollout_failed", 0) == 0 and r.get("stale_dropped", 0) == 0, r
            assert r["rollout_staleness_max"] == 0 and r["weight_sync_tries"] == 1, r
            assert math.isfinite(r["loss"]) and r["branch"] == want["branch"]
            assert abs(r["loss"] - want["loss"]) < 1e-4, (
                mode,
                [x["loss"] for x in rows],
                [x["loss"] for x in ref_rows],
            )


def test_replica_killed_mid_rollout_loses_no_sample(tiny, sglang_students, sglang_python, tmp_path):
    """A real SGLang server of its own is killed (SIGKILL to its process group) as soon as it answered one sample:
    every sample still comes back (from the other server) with the in-process engine's greedy tokens, and the
    next round is all the survivor's."""
    from tests.sglang_servers import start_sglang_servers

    urls = sglang_students
    (victim,) = start_sglang_servers(sglang_python, [tiny / "student"], tmp_path)
    try:
        pair = [victim.url, urls[1]]
        (out,) = run_on_ranks(w.kill_mid_rollout, 1, str(tiny / "student"), pair, victim.proc.pid)
    finally:
        victim.stop()
    assert "after" in out["killed"], "the victim answered nothing: the test proves nothing"
    for rnd in out["rounds"]:
        assert rnd["errors"] == [None] * len(rnd["errors"])
        assert_same_tokens(rnd["served"], out["ref"])
    assert set(out["rounds"][1]["servers"]) == {urls[1]}
    assert out["stats"][victim.url]["deaths"] >= 1
