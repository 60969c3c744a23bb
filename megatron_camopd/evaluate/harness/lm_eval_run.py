"""Run lm-evaluation-harness on an HF model directory and keep its own results files.

``run_lm_eval`` calls ``lm_eval.simple_evaluate`` with model ``hf`` (``pretrained=<dir>``, chat template applied),
a ``TaskManager`` over the YAML tasks shipped in ``harness/tasks`` (plus ``include_path`` dirs of the user's own,
lm-eval's built-in tasks only when asked for by name) and lm-eval's ``EvaluationTracker``, which writes
``<out>/<model>/results_<date>.json`` and ``samples_<task>_<date>.jsonl`` exactly as ``lm_eval --output_path
<out> --log_samples`` does. Offline: the Hugging Face offline switches are set before lm-eval is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_camopd.errors import SpecError
from megatron_camopd.evaluate.harness import TASKS_DIR, force_offline

log = logging.getLogger("megatron_camopd.eval")
SHIPPED = ("camopd_math500", "camopd_mcq")


def _import_lm_eval() -> Any:
    force_offline()
    try:
        import lm_eval
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SpecError(
            f"--bench lm_eval tasks need lm-evaluation-harness: pip install 'megatron-camopd[eval]' ({exc})"
        ) from None
    return lm_eval, EvaluationTracker, TaskManager


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    metadata: dict[str, Any] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    include_path: Sequence[str] = (),
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate ``tasks`` with lm-eval; returns ``{"results_file", "results" (lm-eval's per-task dict),
    "metrics": {task: {metric: value}}, "n_samples": {task: n}}``."""
    lm_eval, EvaluationTracker, TaskManager = _import_lm_eval()
    paths = [str(TASKS_DIR), *[str(p) for p in include_path]]
    for p in paths:
        if not Path(p).is_dir():
            raise SpecError(f"--include-path: {p} is not a directory")
    defaults = any(t not in SHIPPED for t in tasks)  # scanning lm-eval's thousands of YAML files costs seconds
    tm = TaskManager(include_path=paths, include_defaults=defaults, metadata=dict(metadata or {}))
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise SpecError(
            f"--bench: lm-eval knows no task {', '.join(unknown)} (shipped: {', '.join(SHIPPED)}; "
            "add --include-path DIR for your own YAML tasks)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_args: dict[str, Any] = {"pretrained": str(Path(model_dir).resolve()), "dtype": dtype, "device": device}
    if chat_template_kwargs:
        model_args["chat_template_args"] = dict(chat_template_kwargs)
    tracker = EvaluationTracker(output_path=str(out))
    before = set(out.rglob("results_*.json"))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        limit=limit,
        batch_size=batch_size,
        apply_chat_template=True,
        task_manager=tm,
        evaluation_tracker=tracker,
        log_samples=True,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for name in results["configs"]:
        tracker.save_results_samples(task_name=name, samples=samples[name])
    written = sorted(set(out.rglob("results_*.json")) - before)
    if not written:
        raise SpecError(f"lm-eval wrote no results file under {out}")
    metrics: dict[str, dict[str, float]] = {}
    for task, res in results["results"].items():
        metrics[task] = {
            k: float(v) for k, v in res.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))
        }
    return {
        "results_file": str(written[-1]),
        "results": results["results"],
        "metrics": metrics,
        "n_samples": {
            t: int(v["effective"]) if isinstance(v, dict) else int(v) for t, v in results.get("n-samples", {}).items()
        },
    }
