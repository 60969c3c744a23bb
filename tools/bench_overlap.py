"""Benchmark: step wall time with teachers served over HTTP (local replicas) vs in-process teachers.

The MOPD/CaMOPD papers score each rollout on teacher servers while the rest of the batch is still generating, and
claim the step time stays close to that of a run whose teacher scores come for free when teacher capacity
suffices. This tool measures it on the tiny CPU spec in one run: the same spec is trained twice, once with the
teachers in process (Megatron models on the trainer's ranks, scoring after generation) and once through
`camopd serve-teacher` replicas (`--replicas` per teacher, subprocesses on this machine); it prints the ratio of
median step times (rollout+scoring and total), skipping the first `--warmup` steps. Only ratios are printed: on a
shared CPU the absolute times mean little. On a 2-core machine the servers compete with the trainer for CPU, so
the ratio is an upper bound of what separate teacher machines give.

    python tools/bench_overlap.py [--steps 6] [--replicas 2] [--prompts 8] [--max-new-tokens 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _spec(root: Path, teachers: dict, ckpt: Path, args: argparse.Namespace, out: Path) -> Path:
    import yaml

    spec = yaml.safe_load((REPO / "yaml/examples/camopd_tiny_cpu.yaml").read_text())
    spec["model"]["hf_path"] = str(root / "student")
    spec["teachers"] = teachers
    for stream in spec["data"]["streams"]:
        stream["path"] = str(root / "data" / f"{stream['name']}.jsonl")
    spec["rollout"].update(prompts_per_step=args.prompts, max_new_tokens=args.max_new_tokens)
    spec["train"].update(steps=args.steps)
    spec["checkpoint"] = {"dir": str(ckpt), "save_interval": 0, "resume": "never"}
    spec["logging"] = {"log_interval": 1, "progress": "off", "diagnostics": False}
    out.write_text(yaml.safe_dump(spec))
    return out


def train_rows(spec: Path, ckpt: Path, log: Path, env: dict[str, str]) -> list[dict]:
    """`camopd train SPEC` in a subprocess (output to `log`); the run's metrics rows (tools/bench_async.py too)."""
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "megatron_camopd.cli", "train", str(spec)],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}); see {log}:\n{log.read_text()[-3000:]}")
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _medians(rows: list[dict], warmup: int) -> tuple[float, float]:
    rows = rows[warmup:] or rows
    return (
        statistics.median(r["rollout_s"] for r in rows),
        statistics.median(r["rollout_s"] + r["train_s"] for r in rows),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(REPO / "runs" / "tiny_cpu"), help="tiny setup (made if missing)")
    ap.add_argument("--out", default=None, help="work dir (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=2, help="serve-teacher replicas per teacher")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    from megatron_camopd.demo.tiny import make_tiny_setup
    from megatron_camopd.serve.server import start_local_replicas

    root = Path(args.root)
    if not (root / "student" / "config.json").exists():
        make_tiny_setup(root)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_overlap_"))
    work.mkdir(parents=True, exist_ok=True)
    names = ("general", "domain")
    inproc = {n: {"hf_path": str(root / f"teacher_{n}")} for n in names}
    rows_in = train_rows(
        _spec(root, inproc, work / "inproc", args, work / "inproc.yaml"), work / "inproc", work / "inproc.log", _env()
    )
    replicas = {}
    try:
        for n in names:
            (work / f"serve_{n}").mkdir(exist_ok=True)
            replicas[n] = start_local_replicas(root / f"teacher_{n}", work / f"serve_{n}", args.replicas, env=_env())
        served = {n: {"urls": [r.url for r in replicas[n]]} for n in names}
        rows_http = train_rows(
            _spec(root, served, work / "http", args, work / "http.yaml"), work / "http", work / "http.log", _env()
        )
    finally:
        for reps in replicas.values():
            for r in reps:
                r.stop()
    (roll_in, step_in), (roll_http, step_http) = _medians(rows_in, args.warmup), _medians(rows_http, args.warmup)
    result = {
        "step_time_ratio_http_vs_inprocess": step_http / step_in,
        "rollout_phase_ratio_http_vs_inprocess": roll_http / roll_in,
        "steps_measured": len(rows_in[args.warmup :]),
        "replicas_per_teacher": args.replicas,
        "teacher_failed_http": sum(r["teacher_failed"] for r in rows_http),
        "max_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(rows_in, rows_http)),
    }
    ratio = result["step_time_ratio_http_vs_inprocess"]
    print(f"step time, HTTP ({args.replicas} replicas/teacher) / in-process: {ratio:.3f}")
    print(
        f"rollout+scoring phase, HTTP / in-process:               {result['rollout_phase_ratio_http_vs_inprocess']:.3f}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
