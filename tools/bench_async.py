"""Benchmark: step wall time with rollouts overlapped with training (`rollout.max_staleness: 1`) over on-policy
(`max_staleness: 0`), the student served by `camopd serve` replicas in their own processes (`rollout.engine:
sglang`, weights synced over gloo after every step), on the tiny CPU spec.

One run: the replicas start once, then the two configurations are trained alternately (`--repeats` pairs, so slow
drift of a shared machine hits both alike). Step wall time is the difference of consecutive metrics rows'
`time`, skipping the first `--warmup` steps of each run; medians over all runs of a configuration. From the
on-policy runs: t_gen = median `rollout_s` (the servers generate, in-process teachers score) and t_train = the
rest of the step (train + weight sync + bookkeeping). Perfect overlap would give a step time of
max(t_gen, t_train), so the expected ratio is max(t_gen, t_train) / (t_gen + t_train); the measured ratio is
median step(k=1) / median step(k=0). On a machine with few cores the servers and the trainer share them, so the
overlap is bounded by the cores, not by the pipeline: give each process its threads (`--server-threads`,
`--trainer-threads`) and read the numbers with `nproc` in mind (printed).

    python tools/bench_async.py [--steps 8] [--warmup 2] [--repeats 2] [--replicas 2] [--prompts 8]
                                [--max-new-tokens 32] [--server-threads 1] [--trainer-threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_overlap import train_rows  # the sibling script's runner (tools/ is sys.path[0] when run as a script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _spec(root: Path, urls: list[str], k: int, ckpt: Path, args: argparse.Namespace, out: Path) -> Path:
    import yaml

    spec = yaml.safe_load((REPO / "yaml/examples/camopd_tiny_cpu.yaml").read_text())
    spec["model"]["hf_path"] = str(root / "student")
    spec["teachers"] = {n: {"hf_path": str(root / f"teacher_{n}")} for n in ("general", "domain")}
    for stream in spec["data"]["streams"]:
        stream["path"] = str(root / "data" / f"{stream['name']}.jsonl")
    spec["rollout"].update(
        prompts_per_step=args.prompts,
        max_new_tokens=args.max_new_tokens,
        engine="sglang",
        max_staleness=k,
        sglang={"urls": urls, "timeout_s": 300.0, "dead_deadline_s": 60.0},
    )
    spec["train"].update(steps=args.steps)
    spec["checkpoint"] = {"dir": str(ckpt), "save_interval": 0, "resume": "never"}
    spec["logging"] = {"log_interval": 1, "progress": "off", "diagnostics": False}
    out.write_text(yaml.safe_dump(spec))
    return out


def _train(spec: Path, ckpt: Path, log: Path, threads: int) -> list[dict]:
    return train_rows(spec, ckpt, log, _env(threads))


def _step_times(rows: list[dict], warmup: int) -> list[float]:
    times = [r["time"] for r in rows]
    return [b - a for a, b in zip(times, times[1:])][warmup:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="step intervals skipped at the start of each run")
    ap.add_argument("--repeats", type=int, default=2, help="(k=0, k=1) pairs, interleaved")
    ap.add_argument("--replicas", type=int, default=2, help="student servers (own processes)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of each server process")
    ap.add_argument("--trainer-threads", type=int, default=1, help="torch threads of the trainer process")
    ap.add_argument("--root", help="an existing tiny setup (else one is made under --out)")
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.steps < args.warmup + 3:
        ap.error("--steps must exceed --warmup by at least 3")

    from megatron_camopd.demo.tiny import make_tiny_setup
    from megatron_camopd.serve.server import start_local_replicas

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_async_"))
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.root) if args.root else Path(make_tiny_setup(out / "tiny"))
    replicas = start_local_replicas(root / "student", out, args.replicas, env=_env(args.server_threads))
    steps: dict[int, list[float]] = {0: [], 1: []}
    gen, rest = [], []
    try:
        urls = [r.url for r in replicas]
        for rep in range(args.repeats):
            for k in (0, 1):
                ckpt = out / f"run{rep}_k{k}"
                spec = _spec(root, urls, k, ckpt, args, out / f"run{rep}_k{k}.yaml")
                rows = _train(spec, ckpt, out / f"run{rep}_k{k}.log", args.trainer_threads)
                dts = _step_times(rows, args.warmup)
                steps[k] += dts
                if k == 0:
                    body = rows[args.warmup + 1 :]
                    gen += [r["rollout_s"] for r in body]
                    rest += [dt - r["rollout_s"] for dt, r in zip(dts, body)]
                print(f"run {rep} k={k}: median step {statistics.median(dts):.3f}s over {len(dts)} steps", flush=True)
    finally:
        for r in replicas:
            r.stop()
    t_gen, t_train = statistics.median(gen), statistics.median(rest)
    s0, s1 = statistics.median(steps[0]), statistics.median(steps[1])
    result = {
        "cores": os.cpu_count(),
        "replicas": args.replicas,
        "server_threads": args.server_threads,
        "trainer_threads": args.trainer_threads,
        "t_gen_s": round(t_gen, 4),
        "t_train_s": round(t_train, 4),
        "step_k0_s": round(s0, 4),
        "step_k1_s": round(s1, 4),
        "measured_ratio": round(s1 / s0, 4),
        "expected_ratio": round(max(t_gen, t_train) / (t_gen + t_train), 4),
    }
    print(
        f"t_gen {t_gen:.3f}s  t_train {t_train:.3f}s  step k=0 {s0:.3f}s  k=1 {s1:.3f}s  "
        f"measured ratio {s1 / s0:.3f}  expected (perfect overlap) {result['expected_ratio']:.3f}  "
        f"[{os.cpu_count()} cores, {args.replicas} servers x {args.server_threads} threads, trainer "
        f"{args.trainer_threads} threads]"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
