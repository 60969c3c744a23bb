"""`camopd compare SPEC --seeds N [--out DIR] [--methods ...]`: distillation methods side by side, like Table 1.

Every method is the same SPEC with a few overrides (see `setting.METHODS`: vanilla MOPD 1:1 and 3:1, CaMOPD,
CaMOPD without decoupling / without selection, Uni-OPD, Relaxed OPD, SelecTKD, ExOPD), trained for each seed
into `DIR/<method>_seed<k>/` (cached like the demo's phases), then evaluated by greedy exact match on held-out
sets per domain (`--eval DOMAIN=FILE`, default `eval_<domain>.jsonl` next to each stream's data file).

Per domain d the MOPD normalised score is `s_d = (a_method - a_student) / (a_teacher - a_student)` with the
initial student and the teacher routed for d evaluated the same way; a domain where the teacher is no better than
the student (|denominator| < 1 point, e.g. the domain when the student *is* the domain teacher) has no s_d, and
the headline is the mean of the defined s_d. Results: `DIR/compare.md` and `DIR/compare.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

from megatron_camopd.demo.phases import EvalCache, checkpoints, run_phase, say
from megatron_camopd.demo.setting import LABELS, METHODS, method_overrides, stable_hash

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


def _ms(vals: list) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(vals: list, scale: float = 100.0) -> str:
    m, sd = _ms(vals)
    return "n/a" if m is None else f"{scale * m:.1f} ± {scale * sd:.1f}"


def table(results: dict, domains: list[str], baselines: dict) -> str:
    head = "| method | " + " | ".join(f"{d} acc (%)" for d in domains) + " | " + \
        " | ".join(f"s_{d}" for d in domains) + " | score (mean s_d) |"
    lines = [head, "| --- |" + " ---: |" * (2 * len(domains) + 1)]
    for name, acc in baselines.items():
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{100 * acc[d]:.1f}" for d in domains) +
                     " |" + " |" * (len(domains) + 1))
    for m, runs in results.items():
        cells = [_fmt([r["accuracy"][d] for r in runs]) for d in domains]
        cells += [_fmt([r["normalised"]["per_domain"][d] for r in runs], 1.0) for d in domains]
        cells.append(_fmt([r["normalised"]["score"] for r in runs], 1.0))
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="camopd compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="a distillation spec (e.g. DIR/specs/distill_camopd.yaml written by camopd demo)")
    ap.add_argument("--seeds", type=int, default=1)
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
    spec_text = spec_path.read_text()

    def acc(key: str, **source) -> dict[str, float]:
        r = cache.get(key, lambda: evaluate_model(sets, max_new, **source))
        return {d: float(r[d]["accuracy"]) for d in domains}

    m = base.model
    student = acc(f"student:{stable_hash([m.hf_path, m.checkpoint, spec_text])}", hf_path=m.hf_path,
                  checkpoint=m.checkpoint)
    teacher_acc: dict[str, float] = {}
    baselines = {"initial student": student}
    for d in domains:
        name = base.routing.get(d)
        t = base.teachers[name]
        if t.kind != "megatron":
            raise SystemExit(f"camopd compare: teacher {name} is served over HTTP; evaluate it with camopd eval")
        r = acc(f"teacher:{name}:{stable_hash([t.hf_path, t.checkpoint])}", hf_path=t.hf_path, checkpoint=t.checkpoint)
        teacher_acc[d] = r[d]
        baselines[f"teacher {name}"] = r
    results: dict[str, list] = {}
    for meth in args.methods:
        for seed in range(args.seeds):
            extra = [f"train.seed={seed}", f"data.seed={seed}"] + ([f"train.steps={args.steps}"] if args.steps else [])
            overrides = method_overrides(meth, [st.verifier for st in base.data.streams],
                                         base.rollout.prompts_per_step, base.train.micro_batch_size) + extra
            name = f"{meth}_seed{seed}"
            digest = stable_hash([spec_text, overrides])
            run_dir, _ = run_phase(out, name, spec_path, digest, overrides)
            a = acc(f"{name}:{digest}", checkpoint=checkpoints(run_dir)[-1][1])
            results.setdefault(meth, []).append({"seed": seed, "accuracy": a,
                                                 "normalised": normalised(a, student, teacher_acc)})
            say(f"{name}: " + " ".join(f"{d}={100 * v:.1f}" for d, v in a.items()))
    md = ["# Method comparison", "", (f"Spec: `{spec_path}`; {args.seeds} seed(s); greedy exact match on held-out "
          "sets; `s_d = (a_method - a_student) / (a_teacher - a_student)` (n/a where the teacher does not beat the "
          "initial student by >= 1 point)."), "", table(results, domains, baselines), ""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.json").write_text(json.dumps({"spec": str(spec_path), "seeds": args.seeds, "domains": domains,
                                                  "baselines": baselines, "results": results}, indent=1))
    print("\n".join(md))
    say(f"wrote {out / 'compare.md'} and {out / 'compare.json'}")
    return 0
