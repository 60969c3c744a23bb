"""Rollout engines side by side: the KV-cached `megatron` engine, the full-recompute `reference` engine and
transformers' `generate(use_cache=True)`, on the same random Qwen3-layout model and the same prompts.

    python tools/bench_rollout.py [--lengths 64,256,1024] [--batch 16] [--repeats 2] [--reference-up-to 256]

Greedy decoding with no stop token, so every engine produces exactly `new_tokens` tokens per row. The engines
run interleaved, length by length, best of `--repeats` (these machines are shared: compare within one run, never
across runs). One JSON line per length: new_tokens, megatron_tok_s, reference_tok_s, hf_tok_s, megatron_vs_hf
(tok/s ratio), the rows whose greedy tokens equal transformers' (megatron and reference), then one summary line
with the per-token time of each engine at the longest length over the shortest. The reference engine costs
~T^2/2 token forwards per T-token response, so by default it is measured only up to 256 new tokens (null beyond;
`--reference-up-to 1024` measures it too, ~10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference-up-to", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from megatron_camopd.rollout.sampler import build_sampler
    from megatron_camopd.rollout.sampling import SamplingParams

    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = build(Path(tmp), args.hidden, args.layers, args.vocab, args.prompt_len + max(lengths) + 8)
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

    run_engine("megatron", 4), run_hf(4)  # warm-up (allocator, lazy imports)
    per_token: dict[str, dict[int, float]] = {"megatron": {}, "reference": {}, "hf": {}}
    for n in lengths:
        best: dict[str, float] = {}
        toks: dict[str, list] = {}
        names = ["megatron", "hf"] + (["reference"] if n <= args.reference_up_to else [])
        for _ in range(args.repeats):
            for name in names:
                t0 = time.perf_counter()
                toks[name] = run_hf(n) if name == "hf" else run_engine(name, n)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        tok_s = {k: args.batch * n / v for k, v in best.items()}
        for k, v in best.items():
            per_token[k][n] = v / n
        row = {
            "new_tokens": n,
            "megatron_tok_s": round(tok_s["megatron"], 1),
            "reference_tok_s": round(tok_s["reference"], 1) if "reference" in tok_s else None,
            "hf_tok_s": round(tok_s["hf"], 1),
            "megatron_vs_hf": round(tok_s["megatron"] / tok_s["hf"], 3),
            "megatron_rows_equal_hf": sum(a == b for a, b in zip(toks["megatron"], toks["hf"])),
            "reference_rows_equal_hf": (
                sum(a == b for a, b in zip(toks["reference"], toks["hf"])) if "reference" in toks else None
            ),
            "batch": args.batch,
        }
        print(json.dumps(row), flush=True)
    lo, hi = min(lengths), max(lengths)
    summary = {"per_token_time_ratio": f"{hi}/{lo}"}
    for k, d in per_token.items():
        summary[f"{k}_per_token_{hi}_over_{lo}"] = round(d[hi] / d[lo], 3) if lo in d and hi in d else None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
