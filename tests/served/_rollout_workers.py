"""Rollout-server helpers run on a spawned gloo rank (a world of one): the student's training Engine, the
in-process `megatron` engine, and `SglangSampler` against `camopd serve` or real SGLang servers."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from types import SimpleNamespace

import torch

MAX_CONTEXT = 64


def get_weight(url: str, name: str) -> torch.Tensor:
    body = json.dumps({"name": name, "truncate_size": 1 << 30}).encode()
    req = urllib.request.Request(f"{url}/get_weights_by_name", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return torch.tensor(json.loads(resp.read()), dtype=torch.float32)


PROBE = [5, 17, 42, 9, 63, 2, 30, 11, 8, 71, 44, 19]


def _score_diff(url: str, student: str, hf_state: dict) -> float:
    """Max |served log-prob - transformers' log-prob with `hf_state`| over a probe sequence (fp32)."""
    from transformers import AutoModelForCausalLM

    from megatron_camopd.teachers.protocol import build_request, parse_scores

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in hf_state.items()}, strict=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROBE])).logits[0].double(), -1)
    want = torch.stack([logp[i - 1, PROBE[i]] for i in range(1, len(PROBE))]).float()
    body = json.dumps(build_request(PROBE, None)).encode()
    req = urllib.request.Request(f"{url}/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        got = parse_scores(json.loads(resp.read()), PROBE, 1, None, url).logprobs
    return float((got - want).abs().max())


def _model_info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/model_info", timeout=60) as resp:
        return json.loads(resp.read())


def prompts_and_seeds(vocab: int, n: int = 6, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 14, (n,), generator=g).tolist()
    return [torch.randint(5, vocab, (k,), generator=g).tolist() for k in lens], [1000 + i for i in range(n)]


def _setup(student: str):
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.engine import Engine, OptimSettings
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch
    from megatron_camopd.data.tokenizer import Tokenizer
    from megatron_camopd.rollout.sampler import InProcessModel

    init_distributed(1, 1, rank=0, world_size=1, seed=0)
    arch = ModelArch.from_hf_dir(student)
    engine = Engine(
        arch,
        micro_batch_size=2,
        optim=OptimSettings(lr=1e-2),
        init_fn=lambda chunks: load_hf_weights(chunks, student, arch, 0, 1),
    )
    tok = Tokenizer.from_dir(student)
    model = InProcessModel(
        engine.chunks,
        engine.groups,
        arch.vocab_size,
        max_context=MAX_CONTEXT,
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
        micro_batch_size=2,
    )
    return arch, engine, tok, model


def _servers(urls, **kw):
    from megatron_camopd.config.sections import RolloutServersConfig

    return RolloutServersConfig(urls=list(urls), timeout_s=120.0, dead_deadline_s=60.0, **kw)


def _data(rollouts) -> list[tuple]:
    return [(r.response_ids, r.logprobs, r.top1, r.finish_reason, r.entropy) for r in rollouts]


def sync_steps(
    rank: int, world: int, student: str, urls: list[str], mode: str, sync_dir: str, steps: int, greedy: bool = False
) -> dict:
    """`steps` rounds of: served rollouts vs in-process ones, one SFT step on them, weight sync, served weights vs
    the trainer's (every HF tensor, every server), the version each server reports in `/model_info`; which
    tensors differ from the starting weights. `greedy`: for servers that honour no sampling seed (real SGLang on
    a CPU)."""
    from megatron_camopd.backend.hf_mapping import gather_full_state_dict, megatron_to_hf_state_dict
    from megatron_camopd.backend.loss import LossSpec
    from megatron_camopd.rollout.assemble import train_batch
    from megatron_camopd.rollout.kv_engine import MegatronSampler
    from megatron_camopd.rollout.sampling import SamplingParams
    from megatron_camopd.rollout.sglang import SglangSampler

    arch, engine, tok, model = _setup(student)
    sampler = SglangSampler(
        _servers(urls, weight_sync=mode, sync_dir=sync_dir, bucket_mb=1),
        model=model,
        trainer=engine,
        seed=0,
        need_entropy=True,
        model_dir=student,
        tokenizer_dir=student,
    )
    prompts, seeds = prompts_and_seeds(arch.vocab_size)
    params = SamplingParams(
        temperature=0.0 if greedy else 1.0, greedy=greedy, max_new_tokens=12, stop_token_ids=tuple(tok.stop_ids)
    )
    first = megatron_to_hf_state_dict(gather_full_state_dict(engine.models(), arch), arch)
    out: dict = {"rounds": []}
    try:
        for step in range(steps):
            served = sampler.generate(prompts, params, seeds)
            ref = MegatronSampler(model).generate(prompts, params, seeds)
            rnd = {"versions": [r.meta["weight_version"] for r in served], "served": _data(served), "ref": _data(ref)}
            samples = [SimpleNamespace(prompt=SimpleNamespace(prompt_ids=r.prompt_ids), rollout=r) for r in served]
            engine.train_step(
                train_batch(samples, None, list(range(len(samples))), tok.pad_id, 2, sft=True), LossSpec(loss="sft")
            )
            rnd["sync"] = sampler.update_weights(step + 1)
            hf = megatron_to_hf_state_dict(gather_full_state_dict(engine.models(), arch), arch)
            names = [n for n in hf if not (n == "lm_head.weight" and arch.tie_word_embeddings)]
            if greedy:  # SGLang's Qwen3 has no get_weights_by_name: the served scores against the trainer's weights
                rnd["score_diff"] = {u: _score_diff(u, student, hf) for u in urls}
            else:
                rnd["unequal"] = {
                    u: [n for n in names if not torch.equal(get_weight(u, n), hf[n].float())] for u in urls
                }
            rnd["n_tensors"] = len(names)
            rnd["reported"] = [_model_info(u)["weight_version"] for u in urls]
            rnd["changed"] = [n for n in names if not torch.equal(hf[n], first[n])]  # the step did move them
            out["rounds"].append(rnd)
    finally:
        sampler.close()
    return out


def served_vs_in_process(rank: int, world: int, student: str, urls: list[str], params_list) -> dict:
    """Served rollouts (the trainer's current weights synced first, version 0) and the in-process megatron
    engine's for the same prompts and seeds, per SamplingParams; the rollouts themselves for the staleness
    checks."""
    from megatron_camopd.rollout.kv_engine import MegatronSampler
    from megatron_camopd.rollout.sglang import SglangSampler

    arch, engine, _, model = _setup(student)
    sampler = SglangSampler(_servers(urls), model=model, trainer=engine, seed=0)
    prompts, seeds = prompts_and_seeds(arch.vocab_size, n=8, seed=2)
    out: dict = {"served": [], "ref": [], "rollouts": []}
    try:
        for p in params_list:
            served = sampler.generate(prompts, p, seeds)
            out["served"].append(_data(served))
            out["ref"].append(_data(MegatronSampler(model).generate(prompts, p, seeds)))
            out["rollouts"].append(served)
        out["servers"] = sorted({r.meta["server"] for rs in out["rollouts"] for r in rs})
    finally:
        sampler.close()
    return out


def kill_mid_rollout(rank: int, world: int, student: str, urls: list[str], victim_pgid: int) -> dict:
    """Served rollouts (greedy) while the first server's process group is killed (SIGKILL) as soon as it
    answered one sample (the trainer's weights synced to both first; two requests in flight, so one is usually cut
    off mid-generation), then a second round with that server gone; the in-process engine's rollouts."""
    from megatron_camopd.rollout.kv_engine import MegatronSampler
    from megatron_camopd.rollout.sampling import SamplingParams
    from megatron_camopd.rollout.sglang import SglangSampler

    arch, engine, tok, model = _setup(student)
    sampler = SglangSampler(_servers(urls, retries=3, max_in_flight=2), model=model, trainer=engine, seed=0)
    prompts, seeds = prompts_and_seeds(arch.vocab_size, n=12, seed=1)
    params = SamplingParams(temperature=0.0, greedy=True, max_new_tokens=24)
    killed: dict = {}

    def on_finish(i, r) -> None:
        if not killed and r.meta.get("server") == urls[0]:
            os.killpg(victim_pgid, signal.SIGKILL)
            killed["after"] = i

    rounds = []
    try:
        for _ in range(2):
            served = sampler.generate(prompts, params, seeds, on_finish=on_finish)
            rounds.append(
                {
                    "served": _data(served),
                    "servers": [r.meta.get("server") for r in served],
                    "errors": [r.meta.get("error") for r in served],
                }
            )
        stats = {u: vars(s) for u, s in sampler.pool.replica_stats().items()}
    finally:
        sampler.close()
    ref = MegatronSampler(model).generate(prompts, params, seeds)
    return {"rounds": rounds, "ref": _data(ref), "killed": killed, "stats": stats}
