"""`rollout.engine: vllm` before any server runs: the spec's checks (each naming its field), the launcher's vLLM
rollout servers (dev routes on, raw log-probs, a model length that holds a sample), and the client protocol's
refusals of answers that must never be trained on (`rollout/vllm_protocol.py`, pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.errors import RolloutError, SpecError
from megatron_camopd.launch.servers import fill, server_components
from megatron_camopd.rollout.sampling import SamplingParams
from megatron_camopd.rollout.vllm_protocol import completion_request, model_limits, parse_completion

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml"
LAUNCHER = ["launcher.nodes=1", "launcher.gpus_per_node=4", "launcher.vllm_python=/envs/vllm/bin/python"]
URLS = "rollout.vllm.urls=[http://h:1]"


def test_spec_checks_name_the_vllm_fields() -> None:
    with pytest.raises(SpecError, match=r"rollout\.vllm\.weight_sync"):
        load_spec(TINY, ["rollout.engine=vllm", URLS, "rollout.vllm.weight_sync=distributed"])
    with pytest.raises(SpecError, match=r"rollout\.vllm: engine vllm needs urls or discovery_file"):
        load_spec(TINY, ["rollout.engine=vllm"])
    with pytest.raises(SpecError, match=r"rollout\.vllm\.context_length: must be >= 128"):
        load_spec(TINY, ["rollout.engine=vllm", *LAUNCHER, "rollout.vllm.context_length=64"])
    with pytest.raises(SpecError, match=r"rollout\.vllm\.bucket_mb: unknown key"):  # SGLang's distributed sync only
        load_spec(TINY, ["rollout.engine=vllm", URLS, "rollout.vllm.bucket_mb=8"])
    spec = load_spec(TINY, ["rollout.engine=vllm", URLS, "rollout.max_staleness=1", "parallel.tp=2"])
    assert spec.rollout_servers is spec.rollout.vllm  # served: no in-process overlap restriction on tp
    assert spec.rollout.vllm.sync_dir == f"{spec.checkpoint.dir.rstrip('/')}/weights"


def test_launcher_starts_vllm_rollout_servers() -> None:
    spec = load_spec(TINY, ["rollout.engine=vllm", *LAUNCHER, "model.seq_length=null", "rollout.vllm.tp=2"])
    (rollout,) = [c for c in server_components(spec, cpu=True) if c.kind == "rollout"]
    line = " ".join(fill(rollout.argv, vllm_python="/envs/vllm/bin/python", model="/m", port="30200"))
    assert line.startswith("/envs/vllm/bin/python -m vllm.entrypoints.openai.api_server --model /m")
    for part in (
        "--port 30200",
        "--tensor-parallel-size 2",
        f"--max-model-len {spec.seq_length}",  # prompt (64) + response (32): a sample, prompts shorter than it
        "--logprobs-mode raw_logprobs",
        "--enforce-eager",
    ):
        assert part in line, part
    assert rollout.env["VLLM_SERVER_DEV_MODE"] == "1" and rollout.gpus_per_server == 2
    assert rollout.overrides == ("rollout.vllm.discovery_file=@ADDR@",)
    with pytest.raises(ValueError, match="rollout.engine: vllm needs real vLLM servers"):
        server_components(spec, cpu=True, backend="camopd")


def _answer(ids: list[Any], finish: str = "length", lps: list[float] | None = None, top: list | None = None) -> dict:
    lps = lps if lps is not None else [-1.0] * len(ids)
    top = top if top is not None else [{f"token_id:{t}": lp} for t, lp in zip(ids, lps)]
    names = [f"token_id:{t}" for t in ids]
    logprobs = {"tokens": names, "token_logprobs": lps, "top_logprobs": top}
    return {"choices": [{"token_ids": ids, "logprobs": logprobs, "finish_reason": finish}]}


def _parse(obj: dict, max_new: int = 3, stops: frozenset[int] = frozenset({2})):
    return parse_completion(obj, max_new=max_new, stops=set(stops), vocab=10, where="s")


def test_protocol_request_and_refusals() -> None:
    body = completion_request([4, 5], SamplingParams(temperature=0.0, top_k=0, max_new_tokens=9), 7, 3, {2, 8})
    assert body["prompt"] == [4, 5] and body["max_tokens"] == 3 and body["seed"] == 7 and body["temperature"] == 0.0
    assert body["top_k"] == -1 and body["stop_token_ids"] == [2, 8] and body["ignore_eos"] and body["logprobs"] == 1
    good = _parse(
        _answer([5, 6, 7], top=[{"token_id:5": -1.0, "token_id:9": -0.5}, {"token_id:6": -1.0}, {"token_id:9": -0.1}])
    )
    assert good.tokens == [5, 6, 7] and good.top1 == [9, 6, 9] and good.finish == "length"
    assert _parse(_answer([5, 2], "stop")).finish == "stop"
    for obj, match in [
        (_answer([5, 2, 6]), "stop token 2 at position 1"),
        (_answer([5, 6], "stop"), "finish_reason stop but the last token 6"),
        (_answer([5, 6]), "finish_reason length after 2 tokens, asked for 3"),
        (_answer([5, 6, 7], "abort"), "aborted"),
        (_answer([5, 6, 7], lps=[-1.0, 0.5, -1.0]), "is positive"),
        (_answer([5, 6, 7], lps=[-1.0, float("nan"), -1.0]), "not a finite number"),
        (_answer([5, 6, 11]), r"not an id in \[0, 10\)"),
        (_answer([5, 6, 7], top=[{"token_id:5": -2.0}] * 3), "top-1 token is less likely"),
        ({"choices": []}, "expected one completion choice"),
    ]:
        with pytest.raises(RolloutError, match=match):
            _parse(obj)
    bad = _answer([5, 6, 7])
    bad["choices"][0]["logprobs"]["tokens"][1] = "token_id:3"
    with pytest.raises(RolloutError, match="is for token 'token_id:3'"):
        _parse(bad)
    assert model_limits({"data": [{"max_model_len": 129}]}) == (129, 128) and model_limits({}) == (None, None)
