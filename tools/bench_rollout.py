"""Rollout engines side by side: the KV-cached `megatron` engine, real vLLM (its offline `LLM.generate`, CPU
build), transformers' `generate(use_cache=True)` and the full-recompute `reference` engine, on the same random
Qwen3-layout model and the same prompts.

    python tools/bench_rollout.py [--lengths 64,256,1024] [--batch 16] [--repeats 2] [--reference-up-to 256]
                                  [--vllm-python PY | --no-vllm] [--threads N]

Greedy decoding with no stop token, so every engine produces exactly `new_tokens` tokens per row. The engines
run interleaved, length by length, best of `--repeats` (these machines are shared: compare within one run, never
across runs). vLLM runs in its own environment (`--vllm-python`, else `$CAMOPD_VLLM_PYTHON`, else the one
`python -m megatron_camopd.launch.vllm_env` builds) as a worker process holding one `LLM` over the same HF
weights; its time is the `generate` call's, measured in the worker (no HTTP, no process start), with as many
threads as torch uses here. One JSON line per length: new_tokens, megatron_tok_s, vllm_tok_s, hf_tok_s,
reference_tok_s, megatron_vs_vllm and megatron_vs_hf (tok/s ratios), the rows whose greedy tokens equal
transformers' (each engine), then one summary line with the per-token time of each engine at the longest length
over the shortest. The reference engine costs
~T^2/2 token forwards per T-token response, so by default it is measured only up to 256 new tokens (null beyond;
`--reference-up-to 1024` measures it too, ~10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def build(root: Path, hidden: int, layers: int, vocab: int, max_pos: int):
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.engine import build_chunks
    from megatron_camopd.backend.forward import ParallelGroups
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch
    from megatron_camopd.data.tokenizer import make_tiny_tokenizer
    from megatron_camopd.demo.tiny import make_tiny_model
    from megatron_camopd.rollout.sampler import InProcessModel

    make_tiny_tokenizer(root / "tok")
    heads = max(1, hidden // 64)
    make_tiny_model(
        root / "model",
        root / "tok",
        seed=0,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
    )
    init_distributed(1, 1, None, seed=0)
    arch = ModelArch.from_hf_dir(root / "model")
    chunks, _ = build_chunks(arch, 1, 1, None, "fp32")
    load_hf_weights(chunks, root / "model", arch, 0, 1, 0, 1)
    model = InProcessModel(
        chunks,
        ParallelGroups.from_parallel_state(),
        arch.vocab_size,
        max_context=max_pos,
        pad_id=0,
        eos_id=None,
        micro_batch_size=10**6,
    )
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    return model, hf


def vllm_worker(model_dir: str, max_len: int) -> None:
    """Run inside the vLLM environment: one `LLM` on `model_dir`; per stdin line {"n", "prompts"} answer one
    stdout line {"seconds", "tokens"} (greedy, exactly n tokens per prompt)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_len,
        gpu_memory_utilization=0.1,
        skip_tokenizer_init=True,
        seed=0,
    )
    out = sys.__stdout__
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        sp = SamplingParams(
            temperature=0.0, max_tokens=job["n"], min_tokens=job["n"], ignore_eos=True, detokenize=False
        )
        prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
        t0 = time.perf_counter()
        res = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        print(json.dumps({"seconds": dt, "tokens": [list(r.outputs[0].token_ids) for r in res]}), file=out, flush=True)


class VllmWorker:
    """The bench's handle on a `vllm_worker` process in the vLLM environment."""

    def __init__(self, python: str, model_dir: Path, max_len: int, threads: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="nobind", PYTHONUNBUFFERED="1")
        self.log = log
        self.proc = subprocess.Popen(
            [python, __file__, "--vllm-worker", str(model_dir), "--vllm-max-len", str(max_len)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        self._read()  # {"ready": true} once the engine is built

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the vLLM worker exited:\n{self.log.read_text()[-3000:]}")

    def generate(self, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"n": n, "prompts": prompts}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["seconds"], r["tokens"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def vllm_python(arg: str | None) -> str:
    if arg:
        return arg
    from megatron_camopd.launch.vllm_env import ensure_vllm_env

    return str(ensure_vllm_env())


def main() -> None:
    if "--vllm-worker" in sys.argv:
        i = sys.argv.index("--vllm-worker")
        vllm_worker(sys.argv[i + 1], int(sys.argv[sys.argv.index("--vllm-max-len") + 1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference-up-to", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; vLLM gets as many)")
    ap.add_argument("--vllm-python", default=os.environ.get("CAMOPD_VLLM_PYTHON"), help="python of a vLLM env")
    ap.add_argument("--no-vllm", action="store_true", help="leave vLLM out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from megatron_camopd.rollout.sampler import build_sampler
    from megatron_camopd.rollout.sampling import SamplingParams

    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = args.prompt_len + max(lengths) + 8
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    model, hf = build(root, args.hidden, args.layers, args.vocab, max_len)
    vllm = None
    if not args.no_vllm:
        vllm = VllmWorker(
            vllm_python(args.vllm_python), root / "model", max_len, torch.get_num_threads(), root / "vllm.log"
        )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g)
    engines = {"megatron": build_sampler("megatron", model), "reference": build_sampler("reference", model)}

    def run_hf(n: int) -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out[:, args.prompt_len :].tolist()

    def run_engine(name: str, n: int) -> list[list[int]]:
        params = SamplingParams(greedy=True, max_new_tokens=n)
        rolls = engines[name].generate(prompts.tolist(), params, list(range(args.batch)))
        return [r.response_ids for r in rolls]

    def timed(name: str, n: int) -> tuple[float, list[list[int]]]:
        if name == "vllm":
            assert vllm is not None
            return vllm.generate(prompts.tolist(), n)
        t0 = time.perf_counter()
        toks = run_hf(n) if name == "hf" else run_engine(name, n)
        return time.perf_counter() - t0, toks

    for name in ("megatron", "hf") + (("vllm",) if vllm else ()):
        timed(name, 4)  # warm-up (allocator, lazy imports)
    per_token: dict[str, dict[int, float]] = {"megatron": {}, "vllm": {}, "hf": {}, "reference": {}}
    try:
        for n in lengths:
            best: dict[str, float] = {}
            toks: dict[str, list] = {}
            names = (
                ["megatron", "hf"] + (["vllm"] if vllm else []) + (["reference"] if n <= args.reference_up_to else [])
            )
            for _ in range(args.repeats):
                for name in names:
                    dt, toks[name] = timed(name, n)
                    best[name] = min(best.get(name, float("inf")), dt)
            tok_s = {k: args.batch * n / v for k, v in best.items()}
            for k, v in best.items():
                per_token[k][n] = v / n
            row: dict = {"new_tokens": n}
            for k in per_token:
                row[f"{k}_tok_s"] = round(tok_s[k], 1) if k in tok_s else None
            for k in ("vllm", "hf"):
                row[f"megatron_vs_{k}"] = round(tok_s["megatron"] / tok_s[k], 3) if k in tok_s else None
            for k in ("megatron", "vllm", "reference"):
                row[f"{k}_rows_equal_hf"] = sum(a == b for a, b in zip(toks[k], toks["hf"])) if k in toks else None
            row["batch"] = args.batch
            print(json.dumps(row), flush=True)
    finally:
        if vllm is not None:
            vllm.close()
        tmp.cleanup()
    lo, hi = min(lengths), max(lengths)
    summary = {"per_token_time_ratio": f"{hi}/{lo}"}
    for k, d in per_token.items():
        summary[f"{k}_per_token_{hi}_over_{lo}"] = round(d[hi] / d[lo], 3) if lo in d and hi in d else None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
