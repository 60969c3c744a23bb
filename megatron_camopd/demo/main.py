"""`camopd demo --out DIR [--quick] [--seed S] [--seeds N]`: the CaMOPD story end to end on one CPU, from scratch.

Phases (each cached under DIR, skipped on a re-run while its settings hash is unchanged):
  1. a tiny Qwen3-architecture base model and a char-level tokenizer (HF files) and the synthetic data;
  2. general teacher: SFT of the base model on general tasks (arithmetic, reversal, sorting, copying);
  3. domain teacher: SFT of the general teacher on the "loud" persona of reversal and copying (the same prompts
     behind a marker, answered in capitals) at a high LR -> it shouts at plain prompts too (forgetting);
  4. greedy exact-match evaluation of both teachers;
  5. on-policy distillation from the domain teacher (student init) with the general teacher on *proxy* general
     prompts and the domain teacher on domain prompts: CaMOPD and vanilla MOPD (1:1) by default, each over
     `--seeds` seeds (train.seed = data.seed = S + k; the teachers are shared), through `compare.run_comparison`,
     every checkpoint evaluated for the curves;
then `DIR/report.md`, `DIR/summary.json`, `DIR/metrics.jsonl` and PNG plots (see demo/report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from megatron_camopd.demo.compare import run_comparison
from megatron_camopd.demo.phases import EvalCache, checkpoints, run_phase, say
from megatron_camopd.demo.setting import (
    SETTINGS,
    DemoSetting,
    distill_spec,
    sft_spec,
    stable_hash,
    write_data,
    write_spec,
)

TOTAL_PHASES = 5


def make_base(s: DemoSetting, root: Path) -> tuple[Path, str]:
    """Tokenizer + random tiny Qwen3 base model in HF format (cached by the model settings)."""
    from megatron_camopd.data.tokenizer import make_tiny_tokenizer
    from megatron_camopd.demo.tiny import make_tiny_model

    model: dict[str, Any] = {
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.hidden // s.heads,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 128,
    }
    digest = stable_hash({"model": model, "seed": s.seed})
    base, tok = root / "base", root / "tokenizer"
    marker = base / "demo_base.json"
    if marker.exists() and json.loads(marker.read_text()).get("digest") == digest:
        say(f"phase 1/{TOTAL_PHASES}: base model cached ({base})")
        return base, digest
    say(f"phase 1/{TOTAL_PHASES}: tokenizer + tiny Qwen3 base model from scratch ({model})")
    make_tiny_tokenizer(tok)
    make_tiny_model(base, tok, seed=s.seed, **model)
    marker.write_text(json.dumps({"digest": digest}))
    return base, digest


def _final(run_dir: Path) -> Path:
    ckpts = checkpoints(run_dir)
    return ckpts[-1][1]


def _portable(obj, root: Path):
    """`obj` with the output directory replaced by a placeholder, so a moved DIR keeps its cache valid."""
    return json.loads(json.dumps(obj, default=str).replace(str(root), "<DIR>"))


def run_pipeline(s: DemoSetting, root: Path) -> dict:
    """Every phase; returns the evaluation results and run directories used by the report."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "setting.json").write_text(json.dumps(dataclasses.asdict(s), indent=1))
    t0 = time.time()
    base, base_digest = make_base(s, root)
    data = write_data(s, root / "data")

    def data_digest(*names: str) -> str:
        return stable_hash([data[n].read_text() for n in names])

    def teacher(phase: int, name: str, what: str, init: dict, data_name: str, role: str, steps, lr, upstream):
        """One SFT phase (cached by its spec, its upstream digest and its data): the run directory, its digest."""
        say(f"phase {phase}/{TOTAL_PHASES}: {name.replace('_', ' ')} = SFT of {what} ({steps} steps at lr {lr:g})")
        spec = sft_spec(s, name, init, data[data_name], role, root / name, steps, lr)
        digest = stable_hash([_portable(spec, root), upstream, data_digest(data_name)])
        return run_phase(root, name, spec, digest)[0], digest

    general, g_digest = teacher(
        2,
        "general_teacher",
        f"the base model on {', '.join(s.general_tasks)}",
        {"hf_path": str(base)},
        "sft_general",
        "general",
        s.sft_general_steps,
        s.sft_general_lr,
        base_digest,
    )
    persona = (
        f"the same prompts of {', '.join(s.domain_tasks)} answered with the sign-off {s.signoff!r}"
        if s.setting == "signoff"
        else f"the loud persona of {', '.join(s.domain_tasks)}"
    )
    domain, d_digest = teacher(
        3,
        "domain_teacher",
        f"the general teacher on {persona}",
        {"checkpoint": str(general)},
        "sft_domain",
        "domain",
        s.sft_domain_steps,
        s.sft_domain_lr,
        g_digest,
    )

    say(f"phase 4/{TOTAL_PHASES}: greedy exact-match evaluation of the teachers")
    from megatron_camopd.data.synthetic import read_jsonl
    from megatron_camopd.demo.scoring import evaluate_model

    sets = {"general": read_jsonl(data["eval_general"]), "domain": read_jsonl(data["eval_domain"])}
    cache = EvalCache(root / "evals.json")
    how = stable_hash([sets, s.max_new_tokens])  # a changed eval set or decode length re-evaluates

    def evaluate(key: str, checkpoint: Path) -> dict:
        return cache.get(f"{key}:{how}", lambda: evaluate_model(sets, s.max_new_tokens, checkpoint=checkpoint))

    models = {
        "general_teacher": evaluate(f"general_teacher:{g_digest}", _final(general)),
        "domain_teacher": evaluate(f"domain_teacher:{d_digest}", _final(domain)),
    }

    def acc(r: dict) -> dict[str, float]:
        return {b: float(r[b]["accuracy"]) for b in ("general", "domain")}

    seeds = [s.seed + k for k in range(s.distill_seeds)]
    say(
        f"phase 5/{TOTAL_PHASES}: on-policy distillation from the domain teacher (proxy general prompts: "
        f"{', '.join(s.proxy_tasks)}; methods: {', '.join(s.demo_methods)}; seeds {seeds}), each run evaluated "
        "at its checkpoints"
    )
    spec_path = write_spec(
        distill_spec(s, "distill", _final(domain), _final(general), _final(domain), data, root / "distill"),
        root / "specs" / "distill.yaml",
    )
    upstream = stable_hash([d_digest, data_digest("proxy_general", "prompts_domain")])
    runs = run_comparison(
        spec_path,
        root,
        s.demo_methods,
        seeds,
        evaluate,
        acc(models["domain_teacher"]),
        acc(models["general_teacher"]),
        prefix="distill_",
        upstream=upstream,
        curves=True,
    )
    for name, r in models.items():
        say(f"  {name:16s} general {r['general']['accuracy']:.3f}  domain {r['domain']['accuracy']:.3f}")
    say(f"pipeline finished in {time.time() - t0:.0f}s")
    return {"models": models, "runs": runs, "data": data, "seeds": seeds}


def demo_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="camopd demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (phases are cached there)")
    ap.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline in ~1-2 minutes")
    ap.add_argument(
        "--setting",
        default="loud",
        choices=list(SETTINGS),
        help="loud: the domain is a marked persona (`! reverse: abc` -> `CBA`); signoff: the domain answers the same "
        "unmarked prompts and ends with a sign-off token where the general teacher stops (demo/signoff.py)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the data, the base model and the teachers")
    ap.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="distillation seeds per method (default 2; 1 in --quick): train.seed = data.seed = "
        "seed + k, the teachers shared",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch threads (default: 2 where there are 2 cores; measured ~1.5x faster than 1 on an "
        "idle 2-core machine; use 1 on a busy one)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting of the demo (a DemoSetting field, value in YAML), e.g. "
        "--set distill_steps=192; repeatable; the changed phases re-run, the rest stay cached",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    logging.getLogger("megatron_camopd").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    s = DemoSetting.named(args.setting, args.seed, quick=args.quick).with_overrides(args.set)
    if args.seeds is not None:
        if args.seeds < 1:
            ap.error("--seeds must be >= 1")
        s = dataclasses.replace(s, distill_seeds=args.seeds)
    root = Path(args.out)
    result = run_pipeline(s, root)
    from megatron_camopd.demo.report import write_report

    summary = write_report(s, root, result)
    say(f"report: {root / 'report.md'}")
    say(f"summary: {json.dumps({k: {m: round(a, 3) for m, a in summary[k].items()} for k in ('general', 'domain')})}")
    return 0
