"""`camopd compare SPEC --seeds N|S1,S2,... [--out DIR] [--methods ...]`: distillation methods side by side over seeds.

Every method is the same SPEC with a few overrides (see `setting.METHODS`: vanilla MOPD 1:1 and 3:1, CaMOPD,
CaMOPD without decoupling / without selection, Uni-OPD, Relaxed OPD, SelecTKD, ExOPD), trained once per seed k
(`train.seed=k`, `data.seed=k`: initialisation of the sampling streams and the prompt order) into
`DIR/<method>_seed<k>/` (cached like the demo's phases), then evaluated by greedy exact match on held-out sets per
domain (`--eval DOMAIN=FILE`, default `eval_<domain>.jsonl` next to each stream's data file).

Per domain d the MOPD normalised score is `s_d = (a_method - a_student) / (a_teacher - a_student)` with the
initial student and the teacher routed for d evaluated the same way; a domain where the teacher is no better than
the student (|denominator| < 1 point, e.g. the domain when the student *is* the domain teacher) has no s_d, and
the headline is the mean of the defined s_d. Per method: mean ± std over seeds, the paired difference against
vanilla MOPD (1:1) on the same seed with a bootstrap 95% CI (`demo/stats.py`), the referee's instruments from
each run's `metrics.jsonl`, and the CPU seconds it cost. Results: `DIR/compare.md`, `DIR/compare.json`,
`DIR/compare.png` (`demo/compare_report.py`). The demo's distillation phase calls `run_comparison` too.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_camopd.demo.phases import EvalCache, checkpoints, phase_seconds, run_phase, say
from megatron_camopd.demo.setting import METHODS, method_overrides, stable_hash
from megatron_camopd.demo.stats import instruments, series

MIN_DENOMINATOR = 0.01


def eval_files(spec, given: list[str]) -> dict[str, Path]:
    """Held-out set per domain: --eval DOMAIN=FILE, else eval_<domain>.jsonl beside the domain's stream data."""
    from megatron_camopd.errors import SpecError

    out: dict[str, Path] = {}
    for item in given:
        dom, sep, path = item.partition("=")
        if not sep:
            raise SpecError(f"--eval {item!r}: expected DOMAIN=FILE")
        out[dom] = Path(path)
    for st in spec.data.streams:
        cand = Path(st.path).parent / f"eval_{st.domain}.jsonl"
        out.setdefault(st.domain, cand)
    for dom, p in out.items():
        if not p.exists():
            raise SpecError(f"no held-out set for domain {dom!r}: {p} does not exist (pass --eval {dom}=FILE)")
    return out


def normalised(acc: dict[str, float], student: dict[str, float], teacher: dict[str, float]) -> dict:
    """s_d per domain (None where the teacher does not beat the student) and their mean."""
    s = {}
    for d, a in acc.items():
        den = teacher[d] - student[d]
        s[d] = (a - student[d]) / den if abs(den) >= MIN_DENOMINATOR else None
    defined = [v for v in s.values() if v is not None]
    return {"per_domain": s, "score": sum(defined) / len(defined) if defined else None}


def run_comparison(
    spec_path: Path,
    out: Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    evaluate: Callable[[str, Path], dict],
    student: dict[str, float],
    teacher: dict[str, float],
    *,
    prefix: str = "",
    upstream: str = "",
    steps: int | None = None,
    curves: bool = False,
) -> dict[str, list[dict]]:
    """Train every (method, seed) of `spec_path` into `out/<prefix><method>_seed<k>` (cached by the spec text, the
    overrides and `upstream`, the digest of whatever produced the spec's models) and evaluate it.

    `evaluate(key, checkpoint)` returns {domain: {"accuracy": ..., "per_task": ...}} (cached by key). Per run:
    seed, accuracy and per-task accuracy per domain, the normalised score against `student` / `teacher`, the
    instruments of its metrics, its training seconds, and with `curves` every checkpoint's accuracies."""
    from megatron_camopd.config import load_spec
    from megatron_camopd.loop.metrics import read_metrics

    base = load_spec(spec_path)
    spec_text = spec_path.read_text()
    verifiers: list[str] = [st.verifier for st in base.data.streams]
    results: dict[str, list[dict]] = {}
    for meth in methods:
        for seed in seeds:
            extra = [f"train.seed={seed}", f"data.seed={seed}"] + ([f"train.steps={steps}"] if steps else [])
            overrides = (
                method_overrides(meth, verifiers, base.rollout.prompts_per_step, base.train.micro_batch_size) + extra
            )
            name = f"{prefix}{meth}_seed{seed}"
            digest = stable_hash([spec_text, overrides, upstream])
            run_dir, _ = run_phase(out, name, spec_path, digest, overrides)
            ckpts = checkpoints(run_dir)
            curve = [
                (step, evaluate(f"{name}:{digest}:{step}", path)) for step, path in (ckpts if curves else ckpts[-1:])
            ]
            final = curve[-1][1]
            acc = {d: float(r["accuracy"]) for d, r in final.items()}
            results.setdefault(meth, []).append(
                {
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "accuracy": acc,
                    "per_task": {d: r.get("per_task", {}) for d, r in final.items()},
                    "normalised": normalised(acc, student, teacher),
                    "instruments": instruments(rows := read_metrics(run_dir / "metrics.jsonl")),
                    "series": series(rows),
                    "seconds": phase_seconds(out, name),
                    "curve": [(step, {d: float(r["accuracy"]) for d, r in ev.items()}) for step, ev in curve],
                }
            )
            say(f"{name}: " + " ".join(f"{d}={100 * v:.1f}" for d, v in sorted(acc.items())))
    return results


def parse_seeds(text: str) -> list[int]:
    """`--seeds`: a count N (seeds 0..N-1) or a comma-separated list of distinct seeds ("3,7,11" or "5,")."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) == 1:
            n = int(parts[0])
            if n < 1:
                raise argparse.ArgumentTypeError(f"a seed count must be >= 1, got {n}")
            return list(range(n))
        seeds = [int(p) for p in parts if p]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a count or a comma-separated list of seeds, got {text!r}") from e
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="camopd compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="a distillation spec (e.g. DIR/specs/distill.yaml written by camopd demo)")
    ap.add_argument(
        "--seeds",
        type=parse_seeds,
        default=[0, 1, 2],
        help="a count N (seeds 0..N-1) or an explicit comma-separated list (e.g. 3,7,11); >= 3 seeds for an "
        "interval worth reading",
    )
    ap.add_argument("--out", default=None, help="output directory (default: compare/ beside the spec)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--eval", action="append", default=[], metavar="DOMAIN=FILE", help="held-out set per domain")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps for every run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    from megatron_camopd.config import load_spec
    from megatron_camopd.data.synthetic import read_jsonl
    from megatron_camopd.demo.compare_report import write_comparison
    from megatron_camopd.demo.scoring import evaluate_model

    spec_path = Path(args.spec).resolve()
    base = load_spec(spec_path)
    out = Path(args.out) if args.out else spec_path.parent.parent / "compare"
    out.mkdir(parents=True, exist_ok=True)
    files = eval_files(base, args.eval)
    sets = {d: read_jsonl(p) for d, p in files.items()}
    domains = sorted(sets)
    max_new = base.rollout.max_new_tokens
    cache = EvalCache(out / "evals.json")
    how = stable_hash([sets, max_new])

    def evaluate(key: str, checkpoint: str | Path | None = None, **source) -> dict:
        src = dict(source, checkpoint=checkpoint) if checkpoint is not None else source
        return cache.get(f"{key}:{how}", lambda: evaluate_model(sets, max_new, **src))

    tasks: dict[str, dict] = {}  # baseline -> domain -> task -> accuracy

    def acc(r: dict, name: str | None = None) -> dict[str, float]:
        if name is not None:
            tasks[name] = {d: r[d].get("per_task", {}) for d in domains}
        return {d: float(r[d]["accuracy"]) for d in domains}

    m = base.model
    student = acc(
        evaluate(f"student:{stable_hash([m.hf_path, m.checkpoint])}", hf_path=m.hf_path, checkpoint=m.checkpoint),
        "initial student",
    )
    teacher: dict[str, float] = {}
    baselines = {"initial student": student}
    for d in domains:
        name = base.routing.get(d)
        if name is None:
            raise SystemExit(f"camopd compare: domain {d} is not routed to a teacher")
        t = base.teachers[name]
        if t.kind != "megatron":
            raise SystemExit(f"camopd compare: teacher {name} is served over HTTP; evaluate it with camopd eval")
        r = acc(
            evaluate(
                f"teacher:{name}:{stable_hash([t.hf_path, t.checkpoint])}", hf_path=t.hf_path, checkpoint=t.checkpoint
            ),
            f"teacher {name}",
        )
        teacher[d] = r[d]
        baselines[f"teacher {name}"] = r
    results = run_comparison(spec_path, out, args.methods, args.seeds, evaluate, student, teacher, steps=args.steps)
    md = write_comparison(out, spec_path, domains, baselines, results, threads=args.threads, baseline_tasks=tasks)
    print(md)
    say(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
    return 0
