"""Evaluation of a HuggingFace causal LM on prompts with reference answers: accuracy and unbiased pass@k.

``evaluate_hf_model(model, tokenizer, examples, verifier, ...)`` renders each example's chat ``messages`` with the
tokenizer's chat template (the same rendering training prompts get), generates in left-padded batches with
``transformers`` ``generate`` (greedy by default; ``num_samples`` > 1 samples at ``temperature``), cuts each
response at the first stop token, scores it with a verifier of ``data.verifiers`` and reports the mean score
(``accuracy``) and, with several samples, ``pass@k`` from the unbiased estimator of Chen et al. (2021):
``pass@k = mean over prompts of 1 - C(n - c, k) / C(n, k)`` with ``n`` samples of which ``c`` are correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.data.verifiers import get_verifier
from megatron_camopd.errors import DataError, SpecError

VerifierLike = str | Callable[[str, Any], float]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: probability that k of the n samples (c correct) contain a correct one."""
    if not (0 <= c <= n) or n < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i), stable for large n
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over prompts, each with ``n`` samples and ``correct_counts[i]`` correct ones."""
    if not correct_counts:
        return 0.0
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct_counts]))


def _wrap(tokenizer: Any) -> Tokenizer:
    return (
        tokenizer
        if isinstance(tokenizer, Tokenizer)
        else Tokenizer(tokenizer, getattr(tokenizer, "name_or_path", None))
    )


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Chat-template token ids ending in the assistant header; plain joined text when there is no template."""
    if getattr(tokenizer.hf, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode_text("\n".join(m["content"] for m in messages))


def _cut(ids: Sequence[int], stops: set[int]) -> list[int]:
    """The response up to (without) its first stop token."""
    out = []
    for t in ids:
        if t in stops:
            break
        out.append(int(t))
    return out


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[str]]:
    """``num_samples`` decoded responses per prompt (greedy when num_samples == 1 and temperature == 0)."""
    greedy = num_samples == 1 and temperature == 0.0
    stops = set(tokenizer.stop_ids)
    pad = tokenizer.pad_id
    device = next(model.parameters()).device
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=sorted(stops), pad_token_id=pad)
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=num_samples
            )
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = gen[:, width:].tolist()
        for i in range(len(chunk)):
            rows = new[i * num_samples : (i + 1) * num_samples]
            out.append([tokenizer.decode(_cut(r, stops), skip_special_tokens=True) for r in rows])
    return out


def evaluate_hf_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    verifier: VerifierLike,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    ks: Sequence[int] = (1,),
    seed: int = 0,
    keep_responses: int = 8,
) -> dict[str, Any]:
    """Score ``model`` on ``examples`` (dicts with ``messages`` or ``prompt``, and ``answer``).

    Greedy with ``num_samples=1, temperature=0``; otherwise ``num_samples`` samples per prompt at ``temperature``
    and ``pass@k`` for every ``k`` in ``ks`` (k <= num_samples). Returns ``{"n_examples", "n_samples",
    "accuracy", "pass@k"..., "scores" (per example, mean over samples), "samples" (first ``keep_responses``)}``.
    """
    if not examples:
        raise DataError("evaluate: no examples to evaluate")
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise SpecError("evaluate: num_samples, batch_size and max_new_tokens must be >= 1")
    bad_k = [k for k in ks if not 1 <= k <= num_samples]
    if bad_k:
        raise SpecError(f"evaluate: every k must satisfy 1 <= k <= n = {num_samples} (got {bad_k})")
    if num_samples > 1 and temperature <= 0.0:
        raise SpecError("evaluate: pass@k with n > 1 samples needs temperature > 0")
    score = get_verifier(verifier) if isinstance(verifier, str) else verifier
    tok = _wrap(tokenizer)
    prompts = []
    for i, ex in enumerate(examples):
        messages = ex.get("messages") or ([{"role": "user", "content": ex["prompt"]}] if "prompt" in ex else None)
        if not messages:
            raise DataError(f"evaluate: example {i} has neither 'messages' nor 'prompt'")
        prompts.append(prompt_ids(tok, messages))
    torch.manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        responses = generate_responses(model, tok, prompts, max_new_tokens, batch_size, num_samples, temperature, top_p)
    finally:
        model.train(was_training)
    correct = [[float(score(r, ex.get("answer"))) for r in rs] for rs, ex in zip(responses, examples)]
    result: dict[str, Any] = {
        "n_examples": len(examples),
        "n_samples": num_samples,
        "temperature": temperature if num_samples > 1 or temperature > 0 else 0.0,
        "accuracy": float(np.mean([np.mean(c) for c in correct])),
    }
    counts = [int(sum(v >= 1.0 for v in c)) for c in correct]
    for k in ks:
        result[f"pass@{k}"] = mean_pass_at_k(counts, num_samples, k)
    result["scores"] = [float(np.mean(c)) for c in correct]
    result["samples"] = [
        {"uid": ex.get("uid", str(i)), "answer": ex.get("answer"), "responses": rs, "correct": c}
        for i, (ex, rs, c) in enumerate(zip(examples, responses, correct))
        if i < keep_responses
    ]
    return result


def load_hf_model(model_dir: Path) -> tuple[Any, Any]:
    """(model in fp32 eval mode, project Tokenizer) from an HF directory."""
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise SpecError(f"{model_dir}: not an HF model directory (no config.json) nor a checkpoint of this project")
    tokenizer = Tokenizer.from_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer
