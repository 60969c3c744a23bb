"""`camopd eval MODEL --task TASK[,TASK]` / `--bench BENCH[,BENCH]`: accuracy / pass@k of a model.

``--task``: the project's synthetic or file tasks, generated and scored here, as JSON and a markdown table.
``--bench``: hand-off to the benchmark tools users run (lm-evaluation-harness tasks, HumanEval, IFBench; see
``evaluate.bench``), each writing its own results files, plus the project's table, under ``--out-dir``.

MODEL is a HuggingFace directory or a checkpoint root (or ``iter_*`` dir) of this project, which is converted on
the fly to a temporary HF directory (``convert.megatron_hf.checkpoint_to_hf``). Generation uses transformers on
CPU: greedy by default; ``--n N --temperature T`` samples N responses per prompt and reports pass@k for every
``--k`` (unbiased estimator). ``--export-lm-eval DIR`` also writes each task as an lm-evaluation-harness task.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_camopd.errors import SpecError
from megatron_camopd.evaluate.bench import (
    bench_table,
    check_bench_args,
    parse_benches,
    parse_template_kwargs,
    run_benchmarks,
)
from megatron_camopd.evaluate.core import evaluate_hf_model, load_hf_model
from megatron_camopd.evaluate.lm_eval_export import export_lm_eval
from megatron_camopd.evaluate.tasks import DEFAULT_SEED, load_tasks

log = logging.getLogger("megatron_camopd.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camopd eval", description="Evaluate a model on synthetic or file tasks.")
    p.add_argument("model", help="HF model dir, or a checkpoint root / iter_* dir of this project")
    p.add_argument("--task", default=None, help="comma-separated synthetic task names, or one name with --data")
    p.add_argument(
        "--bench",
        default=None,
        help="comma-separated benchmarks run by their own tools: math500, mcq (lm-eval), humaneval, "
        "ifbench, lm_eval:<task>",
    )
    p.add_argument("--data", default=None, help="JSON/JSONL/Parquet file with prompts and answers")
    p.add_argument("--format", default="messages", help="row format of --data (messages, prompt, medical_mc, ...)")
    p.add_argument("--verifier", default=None, help="exact_match, numeric, mc_letter, code (default: by format)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="examples per task/benchmark (synthetic default 64; file and benchmarks: all)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="synthetic-task and sampling seed")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (1 = greedy)")
    p.add_argument(
        "--k", default=None, help="comma-separated k values for pass@k (default 1; humaneval: 1,5,10, those <= n)"
    )
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0 when n > 1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default 64 for --task; --bench: the task's own (lm-eval YAML 1024, humaneval 512, ifbench 1024)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="results.json", help="JSON results (a .md table is written beside it)")
    p.add_argument("--export-lm-eval", default=None, metavar="DIR", help="also write lm-eval task YAML + data")
    p.add_argument("--out-dir", default="eval_results", help="--bench: directory of every tool's files + table")
    p.add_argument("--mcq-data", default=None, help="--bench mcq: MedQA-style JSONL (default: the shipped sample)")
    p.add_argument(
        "--math-sources",
        default=None,
        help="--bench math500: MMATH data_source names (default MATH500; also AIME2024,AIME2025,CNMO)",
    )
    p.add_argument("--include-path", action="append", default=[], help="--bench: extra lm-eval task YAML dir")
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        help="JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="--bench humaneval: seconds per program")
    return p


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise SpecError(f"--k: '{text}' is not a comma-separated list of integers") from None
    if not ks:
        raise SpecError("--k: give at least one k")
    return ks


def _is_checkpoint(path: Path) -> bool:
    return (path / "latest").is_file() or (path / "train_state.json").is_file() or any(path.glob("iter_*"))


def markdown_table(results: dict[str, Any]) -> str:
    """One row per task: examples, samples, accuracy and each pass@k."""
    tasks = results["tasks"]
    ks = sorted({key for r in tasks.values() for key in r if key.startswith("pass@")}, key=lambda s: int(s[5:]))
    head = ["task", "verifier", "examples", "samples", "accuracy", *ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in tasks.items():
        cells = [
            name,
            r["verifier"],
            str(r["n_examples"]),
            str(r["n_samples"]),
            f"{r['accuracy']:.4f}",
            *[f"{r[k]:.4f}" for k in ks],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _hf_dir(path: Path, tmp: str) -> Path:
    """``path`` itself when it is an HF directory; else a checkpoint of this project converted under ``tmp``."""
    if _is_checkpoint(path) and not (path / "config.json").is_file():
        from megatron_camopd.convert.megatron_hf import checkpoint_to_hf

        log.info("eval: converting checkpoint %s to a temporary HF directory", path)
        return Path(checkpoint_to_hf(path, Path(tmp) / "hf"))
    if not (path / "config.json").is_file():
        raise SpecError(f"{path}: not an HF model directory (no config.json) nor a checkpoint of this project")
    return path


def run_eval(model_path: str | Path, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``model_path`` on the tasks named in ``args``; returns the results dict (also written to disk)."""
    ks = _parse_ks(args.k or "1")
    max_new = args.max_new_tokens or 64
    temperature = args.temperature if args.temperature is not None else (1.0 if args.n > 1 else 0.0)
    tasks = load_tasks(
        args.task.split(","), data=args.data, fmt=args.format, verifier=args.verifier, limit=args.limit, seed=args.seed
    )
    template_kwargs = parse_template_kwargs(args.chat_template_kwargs)
    if args.export_lm_eval:
        for task in tasks:
            paths = export_lm_eval(task, args.export_lm_eval, max_new_tokens=max_new)
            log.info("eval: lm-eval task written to %s", paths["yaml"])
    path = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="camopd_eval_") as tmp:
        model, tokenizer = load_hf_model(_hf_dir(path, tmp))
        tokenizer.chat_template_kwargs = template_kwargs
        results: dict[str, Any] = {"model": str(path), "tasks": {}}
        for task in tasks:
            start = time.perf_counter()
            r = evaluate_hf_model(
                model,
                tokenizer,
                task.examples,
                task.verifier,
                max_new,
                args.batch_size,
                num_samples=args.n,
                temperature=temperature,
                top_p=args.top_p,
                ks=ks,
                seed=args.seed,
            )
            r.update(verifier=task.verifier, source=task.source, seconds=round(time.perf_counter() - start, 3))
            results["tasks"][task.name] = r
            log.info("eval: %s accuracy %.4f (%d examples)", task.name, r["accuracy"], r["n_examples"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    out.with_suffix(".md").write_text(markdown_table(results))
    return results


def run_bench(model_path: str | Path, args: argparse.Namespace) -> dict[str, Any]:
    """`--bench`: every benchmark through its own tool on the HF directory (a checkpoint is converted first)."""
    ks = _parse_ks(args.k or "1,5,10")
    template_kwargs = parse_template_kwargs(args.chat_template_kwargs)
    parse_benches(args.bench)
    check_bench_args(args)
    with tempfile.TemporaryDirectory(prefix="camopd_eval_") as tmp:
        return run_benchmarks(_hf_dir(Path(model_path), tmp), args, ks, template_kwargs)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `camopd eval`; prints the markdown table(s)."""
    from megatron_camopd.evaluate.harness import force_offline

    force_offline()
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.n < 1:
        raise SpecError(f"--n: must be >= 1, got {args.n}")
    if not args.task and not args.bench:
        raise SpecError("camopd eval: give --task (project tasks) and/or --bench (benchmark tools)")
    if args.bench:  # validate the benchmarks before the tasks spend any time
        parse_benches(args.bench)
        check_bench_args(args)
    if args.task:
        results = run_eval(args.model, args)
        print(markdown_table(results), end="")
        print(f"camopd eval: wrote {args.out}")
    if args.bench:
        results = run_bench(args.model, args)
        print(bench_table(results), end="")
        print(f"camopd eval: wrote {Path(args.out_dir) / 'results.json'} and each tool's files under {args.out_dir}")
    return 0
