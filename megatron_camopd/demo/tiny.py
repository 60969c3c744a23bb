"""Tiny HuggingFace models, tokenizer and data made from scratch, for tests, CI and the CPU quick start.

`make_tiny_setup(root)` writes, under `root`:
    tokenizer/                 a char-level tokenizer with a ChatML template
    student/ teacher_general/ teacher_domain/   random tiny Qwen3 models (HF safetensors + tokenizer files)
    data/general.jsonl data/domain.jsonl          synthetic prompts with checkable answers
It matches `yaml/examples/camopd_tiny_cpu.yaml` (root = runs/tiny_cpu). Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_camopd.data.synthetic import make_examples, write_jsonl
from megatron_camopd.data.tokenizer import Tokenizer, make_tiny_tokenizer

TINY_QWEN3 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def make_tiny_model(
    out_dir: str | Path, tokenizer_dir: str | Path, seed: int, arch: str = "qwen3", **overrides: Any
) -> Path:
    """A random tiny causal LM in HF format (with the tokenizer files copied in)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3Config

    tok = Tokenizer.from_dir(tokenizer_dir)
    fields: dict[str, Any] = dict(
        TINY_QWEN3, vocab_size=tok.vocab_size, bos_token_id=None, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )
    fields.update(overrides)
    config: PretrainedConfig
    if arch == "llama":
        fields.pop("head_dim", None)
        config = LlamaConfig(**fields)
    else:
        config = Qwen3Config(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out)
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt") and f.name != "config.json":
            shutil.copy2(f, Path(dst) / f.name)


def make_tiny_data(root: str | Path, n: int = 256, seed: int = 0) -> dict[str, Path]:
    root = Path(root)
    general = [
        ex
        for task in ("arithmetic", "reverse", "sort", "copy")
        for ex in make_examples(task, n // 4, seed=seed, domain="general")
    ]
    domain = make_examples("cipher", n, seed=seed, domain="domain")
    return {
        "general": write_jsonl(general, root / "general.jsonl"),
        "domain": write_jsonl(domain, root / "domain.jsonl"),
    }


def tiny_spec_overrides(root: str | Path) -> list[str]:
    """Overrides pointing `yaml/examples/camopd_tiny_cpu.yaml` at a tiny setup made under `root`."""
    root = Path(root)
    return [
        f"model.hf_path={root / 'student'}",
        f"teachers.general.hf_path={root / 'teacher_general'}",
        f"teachers.domain.hf_path={root / 'teacher_domain'}",
        f"data.streams.0.path={root / 'data' / 'general.jsonl'}",
        f"data.streams.1.path={root / 'data' / 'domain.jsonl'}",
    ]


def make_tiny_setup(root: str | Path, seed: int = 0) -> Path:
    """Everything the tiny CPU spec needs; idempotent (existing pieces are kept)."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        make_tiny_tokenizer(tok_dir)
    for name, s in (("student", seed + 1), ("teacher_general", seed + 2), ("teacher_domain", seed + 3)):
        if not (root / name / "config.json").exists():
            make_tiny_model(root / name, tok_dir, s)
    if not (root / "data" / "domain.jsonl").exists():
        make_tiny_data(root / "data", seed=seed)
    return root


def tiny_main(argv: list[str]) -> int:
    """`camopd tiny [--out runs/tiny_cpu]`: write the tiny setup the example spec points at."""
    import argparse

    ap = argparse.ArgumentParser(prog="camopd tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tiny_cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = make_tiny_setup(args.out, seed=args.seed)
    print(f"tiny setup ready in {root}: camopd train yaml/examples/camopd_tiny_cpu.yaml")
    return 0
