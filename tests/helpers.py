"""Helpers shared by every test folder: the one `camopd` subprocess runner, the one tiny HF model builder and the
HF reference logits of parity tests.

Import as `from tests.helpers import ...`: pyproject's `[tool.pytest.ini_options] pythonpath = ["."]` puts the
repository root on `sys.path` for every test module (packaged folders or not), and ranks spawned by
`torch.multiprocessing` inherit that path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from megatron_camopd.demo.tiny import TINY_QWEN3

REPO = Path(__file__).resolve().parents[1]
TINY_SPEC = REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml"

# The tiny causal LM most tests use: the shape of the demo's tiny Qwen3 (64 wide, 2 layers, GQA 4/2, head_dim 16;
# Qwen3's default head_dim is 128) at 256 positions.
_SHAPE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
TINY_CONFIG: dict[str, Any] = {**{k: TINY_QWEN3[k] for k in _SHAPE}, "max_position_embeddings": 256}
# The one-layer variant of the teacher and server tests: 32 wide, GQA 2/1, untied.
ONE_LAYER_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)


def cli_argv(*args: str) -> list[str]:
    """`camopd ARGS` as an argv for this interpreter (for Popen users)."""
    return [sys.executable, "-m", "megatron_camopd.cli", *args]


def run_cli(
    *args: str,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check_rc: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `camopd ARGS` to completion with its output captured as text. With `check_rc`, assert the exit code is
    that one (the message is the tail of stdout and stderr); without, the caller judges the result."""
    res = subprocess.run(
        cli_argv(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )
    if check_rc is not None:
        assert res.returncode == check_rc, f"camopd {' '.join(args)}: exit {res.returncode}\n" + (
            res.stdout[-3000:] + res.stderr[-3000:]
        )
    return res


def repo_env(**extra: str) -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (subprocesses import this `megatron_camopd`)."""
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **extra}


def tiny_hf_model(
    path: str | Path, *, vocab_size: int, seed: int, arch: str = "qwen3", perturb_norms: bool = False, **config: Any
) -> Path:
    """Save a random tiny causal LM (Qwen3, or Llama with `arch="llama"`) of `TINY_CONFIG` updated by `config` to
    `path` (fp32 safetensors, no tokenizer). `torch.manual_seed(seed)` is set right before the weights are drawn,
    so the same arguments give the same bytes; `perturb_norms` then adds 0.1 * N(0, 1) to every norm weight (all
    ones otherwise, so a mis-mapped norm would not show)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    if arch not in ("qwen3", "llama"):
        raise ValueError(f"arch must be 'qwen3' or 'llama', not {arch!r}")
    cfg = (Qwen3Config if arch == "qwen3" else LlamaConfig)(**{**TINY_CONFIG, "vocab_size": vocab_size, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    if perturb_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return Path(path)


def hf_logits(hf_dir: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits [B, T, V] of `ids` [B, T] for the model saved in `hf_dir` (the parity reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def swap_token_ids(src: Path, dst: Path) -> Path:
    """A copy of the HF directory `src` whose tokenizer has the ids of 'a' and 'b' swapped: same size, other ids
    (what the tokenizer checks of teachers must refuse)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    path = dst / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    path.write_text(json.dumps(tok))
    return dst
