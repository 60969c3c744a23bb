"""The Python halves of `tools/gpu_check.sh`'s checks (each prints one summary line; exit status 1 on failure).

    python tools/gpu_checks.py tiny ROOT                   write the tiny setup; print its spec overrides
    python tools/gpu_checks.py sampled-rollout [--dtype fp32] [--batch 16] [--new-tokens 64]
    python tools/gpu_checks.py metrics CKPT_DIR --steps N [--max-lp-absdiff X] [--staleness K] [--resumed-at S]

`sampled-rollout`: the KV-cached `megatron` engine and the full-recompute `reference` engine sample the same
prompts with the same seeds at temperature 1 (top-p `--top-p`, default off) on this machine's device (CUDA when
present): the uniforms are drawn on the CPU and meet the device's logits in `choose_tokens` (the first sampled
GPU rollout crashed there). Both engines must produce the same tokens on at least `--min-equal` of the rows
(float rounding can flip a token, after which a row diverges), finite log-probs, and on the rows that agree
log-probs within `--lp-tol` of each other.

`metrics`: reads `CKPT_DIR/metrics.jsonl` of a `camopd train` run and checks it has steps 1..N, finite losses,
`train_rollout_lp_absdiff` (the trainer's log-probs of each rollout token against the rollout engine's) at most
`--max-lp-absdiff` on every step (steps after the first sample with weights a training step changed: the FP8
weight copies and the RoPE table a rollout built must serve the next training step), with `--staleness K` the
one-step-off pipeline's `rollout_staleness_max` = min(step - 1, K), and with `--resumed-at S` that the run
resumed at step S (its log, `CKPT_DIR/resumed.log`, says so), with `--checkpoint-step S` that the newest
checkpoint verifies against its manifest and holds step S.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cmd_tiny(args: argparse.Namespace) -> int:
    from megatron_camopd.demo.tiny import make_tiny_setup, tiny_spec_overrides

    print("\n".join(tiny_spec_overrides(make_tiny_setup(Path(args.root)))))
    return 0


def cmd_sampled_rollout(args: argparse.Namespace) -> int:
    import torch
    from bench_rollout import build  # the sibling benchmark's model (tools/ is sys.path[0] when run as a script)

    from megatron_camopd.rollout.sampler import build_sampler
    from megatron_camopd.rollout.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = build(Path(tmp), args.hidden, 2, args.vocab, args.prompt_len + args.new_tokens + 8)
    if args.dtype != "fp32":
        for c in model.chunks:
            c.to(torch.bfloat16)
    device = next(model.chunks[0].parameters()).device
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=1.0, top_p=args.top_p, max_new_tokens=args.new_tokens)
    seeds = list(range(1000, 1000 + args.batch))
    out = {name: build_sampler(name, model).generate(prompts, params, seeds) for name in ("megatron", "reference")}
    kv, ref = out["megatron"], out["reference"]
    equal = [a.response_ids == b.response_ids for a, b in zip(kv, ref)]
    finite = all(bool(torch.isfinite(torch.as_tensor(r.logprobs)).all()) for r in kv + ref)
    diffs = [
        float((torch.as_tensor(a.logprobs) - torch.as_tensor(b.logprobs)).abs().max())
        for a, b, same in zip(kv, ref, equal)
        if same and len(a.logprobs)
    ]
    lp_diff = max(diffs, default=float("nan"))
    distinct = len({tuple(r.response_ids) for r in kv})
    print(
        f"sampled rollouts on {device} ({args.dtype}): {sum(equal)}/{args.batch} rows equal between the megatron "
        f"and reference engines, log-prob max abs diff {lp_diff:.2e}, {distinct} distinct responses, finite={finite}"
    )
    ok = sum(equal) >= args.min_equal and finite and lp_diff <= args.lp_tol and distinct > 1
    ok &= all(len(r.response_ids) == args.new_tokens for r in kv)  # no stop token: every row runs to the end
    return 0 if ok else 1


def cmd_metrics(args: argparse.Namespace) -> int:
    from megatron_camopd.loop.metrics import read_metrics

    rows = read_metrics(Path(args.ckpt) / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    problems = []
    if steps != list(range(1, args.steps + 1)):
        problems.append(f"steps {steps}, expected 1..{args.steps}")
    if not all(math.isfinite(r["loss"]) for r in rows):
        problems.append(f"losses {[r['loss'] for r in rows]}")
    diffs = [r.get("train_rollout_lp_absdiff", float("nan")) for r in rows]
    if args.max_lp_absdiff is not None and not all(d <= args.max_lp_absdiff for d in diffs):
        problems.append(f"train_rollout_lp_absdiff {diffs} over {args.max_lp_absdiff}")
    if args.staleness is not None:
        lags = [r.get("rollout_staleness_max") for r in rows]
        if lags != [min(s - 1, args.staleness) for s in steps]:
            problems.append(f"rollout_staleness_max {lags}")
    if args.resumed_at is not None:
        log = (Path(args.ckpt) / "resumed.log").read_text() if (Path(args.ckpt) / "resumed.log").exists() else ""
        if f"at step {args.resumed_at}" not in log:
            problems.append(f"no 'resumed ... at step {args.resumed_at}' in {args.ckpt}/resumed.log")
    if args.checkpoint_step is not None:
        from megatron_camopd.backend.checkpoint import latest_checkpoint, verify_checkpoint
        from megatron_camopd.backend.cpu_runtime import init_distributed

        init_distributed(1, 1, seed=0)
        latest = latest_checkpoint(args.ckpt)
        if latest is None or json.loads((verify_checkpoint(latest) / "train_state.json").read_text())["step"] != (
            args.checkpoint_step
        ):
            problems.append(f"the newest checkpoint {latest} does not verify as step {args.checkpoint_step}")
    print(
        json.dumps({"steps": len(rows), "loss": [round(r["loss"], 5) for r in rows], "lp_absdiff_max": max(diffs)})
        + ("" if not problems else " PROBLEMS: " + "; ".join(problems))
    )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny")
    t.add_argument("root")
    s = sub.add_parser("sampled-rollout")
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--prompt-len", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--vocab", type=int, default=512)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-equal", type=int, default=14)
    s.add_argument("--lp-tol", type=float, default=1e-3)
    m = sub.add_parser("metrics")
    m.add_argument("ckpt")
    m.add_argument("--steps", type=int, required=True)
    m.add_argument("--max-lp-absdiff", type=float, default=None)
    m.add_argument("--staleness", type=int, default=None)
    m.add_argument("--resumed-at", type=int, default=None)
    m.add_argument("--checkpoint-step", type=int, default=None, help="the newest checkpoint verifies, at this step")
    args = ap.parse_args(argv)
    return {"tiny": cmd_tiny, "sampled-rollout": cmd_sampled_rollout, "metrics": cmd_metrics}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
