"""Benchmark: the cost of an OPD training step relative to an SFT step on the same tokens.

Measured in one run, on one rollout batch of the tiny CPU spec (or any spec with --spec/overrides): the SFT step
(response-only cross-entropy), the policy-gradient OPD step (IS weights, advantages), the top-k OPD step, and the
signal preparation (gaps, CaMOPD selection; Uni-OPD calibration with method.name=uniopd). Steps alternate to
spread machine noise evenly; the printed numbers are ratios of medians, not absolute times.

    python tools/bench_step.py [--repeats 20] [--spec SPEC] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tiny_overrides() -> list[str]:
    from megatron_camopd.demo.tiny import make_tiny_setup, tiny_spec_overrides

    root = make_tiny_setup(REPO / "runs" / "tiny_cpu")
    return [*tiny_spec_overrides(root), "rollout.prompts_per_step=16", "train.lr=1e-9"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(REPO / "yaml/examples/camopd_tiny_cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from megatron_camopd.backend.loss import LossSpec
    from megatron_camopd.config import load_spec
    from megatron_camopd.loop.session import open_session
    from megatron_camopd.rollout.assemble import add_topk, signal_batch, train_batch
    from megatron_camopd.rollout.collect import collect_step

    tmp = Path(tempfile.mkdtemp(prefix="bench_step_"))
    base = _tiny_overrides() if args.spec.endswith("camopd_tiny_cpu.yaml") else []
    spec = load_spec(args.spec, [*base, f"checkpoint.dir={tmp}", "logging.progress=off", *args.overrides])
    session = open_session(spec)
    samples = collect_step(session.collector, 0, session.schedule.peek())
    rows = list(range(len(samples)))
    width = max(len(s.rollout.ids) for s in samples)
    mbs, pad = spec.train.micro_batch_size, session.tokenizer.pad_id
    # teacher top-k for the same samples (the routed in-process teachers)
    for s in samples:
        s.scores = session.teachers[s.teacher].score_batch([s.rollout.ids], [len(s.prompt.prompt_ids)], args.topk)[0]
    sig = signal_batch(samples, {})

    timings: dict[str, list[float]] = {"sft": [], "opd_pg": [], "opd_topk": [], "prepare": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        signals = session.method.prepare(sig)
        timings["prepare"].append(time.perf_counter() - t)
        pg = train_batch(samples, signals, rows, pad, mbs, width)
        tk = dict(pg, seq_scale=pg["sample_weight"].clone())
        add_topk(tk, samples, rows, sig)
        sft = train_batch(samples, None, rows, pad, mbs, width, sft=True)
        for name, batch, loss in (
            ("sft", sft, LossSpec(loss="sft")),
            ("opd_pg", pg, LossSpec(loss="pg")),
            ("opd_topk", tk, LossSpec(loss="topk")),
        ):
            t = time.perf_counter()
            session.engine.train_step(batch, loss)
            timings[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(
        f"batch: {len(samples)} sequences, {int(sig.mask.sum())} response tokens, width {width}, "
        f"top-k {args.topk}, method {spec.method.name}, {args.repeats} repeats (ratios of medians)"
    )
    print(f"opd_pg_step / sft_step              = {med['opd_pg'] / med['sft']:.3f}")
    print(f"opd_topk_step / sft_step            = {med['opd_topk'] / med['sft']:.3f}")
    print(f"(prepare + opd_pg_step) / sft_step  = {(med['prepare'] + med['opd_pg']) / med['sft']:.3f}")
    print(f"prepare (gaps, selection) / sft_step = {med['prepare'] / med['sft']:.4f}")
    session.close()


if __name__ == "__main__":
    main()
