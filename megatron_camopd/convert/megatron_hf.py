"""HuggingFace <-> Megatron checkpoint conversion in one CPU process (TP=1, PP=1, gloo world of 1).

``checkpoint_to_hf(src, dst)``: a ``dist_checkpointing`` checkpoint of this project, saved at ANY TP/PP/VPP, is
loaded at TP=1/PP=1 (megatron-core reshards on load; the vocabulary padding of the saved layout, 128 * tp, is
honoured by building the model with the checkpoint's padded rows) and written as HF safetensors + config.json +
the tokenizer files recorded under ``ROOT/hf/``. Padding rows are removed; tied embeddings write no ``lm_head``.

``hf_to_checkpoint(src, dst)``: an HF model directory becomes a checkpoint root of this project (``hf/`` meta +
``iter_0000000/`` with the model only), which training can start from with ``model.checkpoint``.

Layout: conversion always builds megatron-core's LOCAL layer spec (TransformerEngine's parameter names, no TE
modules), whatever the machine has, so it runs the same on a CPU login node and a GPU node; checkpoints load across
layer specs in both directions (see backend/checkpoint.py), so a checkpoint written here trains with TE.

Before any tensor is read, the checkpoint's tensor metadata is compared with the model the recorded config
describes, so a config/checkpoint mismatch is a ``CheckpointError`` naming the tensors, not a shape trace from
deep inside torch.distributed.checkpoint (whose vocabulary tensors silently zero-fill on a shape mismatch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_camopd.errors import CheckpointError, SpecError

log = logging.getLogger("megatron_camopd.convert")

PathLike = str | Path
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """torch.distributed (gloo, world 1) + megatron parallel state at TP=PP=1 for the duration of a conversion.

    Reuses an already running world of size 1 (e.g. a caller's) and leaves it running; starts and tears down its
    own otherwise. A larger running world is refused: conversion is a single-process job.
    """
    import torch.distributed as dist

    from megatron_camopd.backend.cpu_runtime import destroy_distributed, init_distributed

    owned = not dist.is_initialized()
    if not owned and dist.get_world_size() != 1:
        raise SpecError(
            f"convert: runs in one process, but torch.distributed already has {dist.get_world_size()} "
            "ranks; run the conversion outside the training job"
        )
    try:  # a world of one uses a private in-memory store: it never joins a surrounding job's rendezvous
        init_distributed(1, 1, rank=0 if owned else None, world_size=1 if owned else None)
        yield
    finally:
        if owned:
            destroy_distributed()


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise SpecError(f"{path}: HuggingFace config.json not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def check_tokenizer_fits(tokenizer_dir: Path, vocab_size: int) -> int | None:
    """SpecError when the tokenizer in ``tokenizer_dir`` can emit ids >= the model's ``vocab_size``.

    Returns the tokenizer's size, or None when the directory has no tokenizer files.
    """
    if not _has_tokenizer(tokenizer_dir):
        return None
    from megatron_camopd.data.tokenizer import Tokenizer

    size = Tokenizer.from_dir(tokenizer_dir).vocab_size
    if size > vocab_size:
        raise SpecError(
            f"{tokenizer_dir}: the tokenizer has {size} tokens but the model's vocab_size is "
            f"{vocab_size}; its ids >= {vocab_size} would have no embedding row"
        )
    return size


def _flat_sharded_tensors(sharded: Any) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)  # e.g. SwiGLU's fc1 is saved as two shards of one key
    return {t.key: t for t in nested_values(sharded) if isinstance(t, ShardedTensor)}


def checkpoint_tensor_meta(ckpt_dir: Path) -> dict[str, Any]:
    """{global key -> ShardedTensor (global_shape, dtype)} stored in a dist_checkpointing directory."""
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    except Exception as exc:  # a missing/corrupt metadata file raises several kinds
        raise CheckpointError(f"{ckpt_dir}: cannot read the checkpoint's tensor metadata: {exc}") from exc
    return dict(meta)


def check_checkpoint_matches(ckpt_dir: Path, chunks: list, vocab_size: int, meta: dict[str, Any]) -> None:
    """CheckpointError when the checkpoint's tensors do not fit the model ``chunks`` exactly.

    Every tensor must exist with the same global shape, both ways; vocabulary-parallel tensors may differ in the
    number of padding rows (the padding depends on the TP size at save time) but must cover ``vocab_size``.
    """
    expected: dict[str, Any] = {}
    for chunk in chunks:
        expected.update(_flat_sharded_tensors(chunk.sharded_state_dict()))
    problems: list[str] = []
    for key, want in expected.items():
        got = meta.get(key)
        if got is None:
            problems.append(f"'{key}' is missing")
            continue
        have, need = tuple(got.global_shape), tuple(want.global_shape)
        if key in _VOCAB_KEYS:
            if have[1:] != need[1:] or have[0] < vocab_size:
                problems.append(f"'{key}' has shape {have}, expected ({vocab_size}+padding, {need[1]})")
        elif have != need:
            problems.append(f"'{key}' has shape {have}, the config implies {need}")
    extra = sorted(k for k in set(meta) - set(expected) if not k.startswith("optimizer."))  # training state
    if extra:
        problems.append(f"{len(extra)} tensor(s) the config has no place for, e.g. '{extra[0]}'")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match the architecture in its hf/config.json: {shown}")


LOCAL_SPEC_FIELDS = dict(bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False)


def _build_tp1(arch: Any, dtype: torch.dtype, padded_vocab: int | None = None) -> list:
    """TP=1/PP=1 model chunks of the local layer spec; ``padded_vocab`` overrides the vocabulary rows (a
    checkpoint's saved padding)."""
    from megatron_camopd.backend.model import build_model_chunks, transformer_config

    config = transformer_config(arch, tp=1, pp=1, dtype=dtype, **LOCAL_SPEC_FIELDS)
    if padded_vocab is not None and padded_vocab != arch.padded_vocab_size(1):
        # build_gpt_model pads arch.vocab_size to 128 * tp; an arch whose vocab is the saved padded size gives
        # exactly the saved rows (a multiple of 128), and the extra rows are dropped again on export.
        arch = dataclasses.replace(arch, vocab_size=padded_vocab)
    return build_model_chunks(arch, config, use_transformer_engine=False)


def checkpoint_to_hf(src: PathLike, dst: PathLike, dtype: str | None = None) -> Path:
    """Megatron checkpoint (root or ``iter_*`` dir, any TP/PP) -> HF model directory ``dst``; returns ``dst``.

    ``dtype`` ("fp32", "bf16", "fp16") casts the exported weights; default: as stored in the checkpoint.
    """
    from megatron_camopd.backend.checkpoint import find_model_meta, load_model_only, resolve_checkpoint
    from megatron_camopd.backend.hf_mapping import gather_full_state_dict, megatron_to_hf_state_dict, save_hf
    from megatron_camopd.backend.model import ModelArch

    src, dst = Path(src), Path(dst)
    ckpt = resolve_checkpoint(src)
    meta_dir = find_model_meta(src)
    hf_config = _read_hf_config(meta_dir)
    arch = ModelArch.from_hf_config(hf_config, source=str(meta_dir / "config.json"))
    tensors = checkpoint_tensor_meta(ckpt)
    emb = tensors.get("embedding.word_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{ckpt}: no 'embedding.word_embeddings.weight' in the checkpoint (not a GPT model?)")
    stored = emb.dtype
    if stored not in _DTYPE_NAMES:
        raise CheckpointError(f"{ckpt}: unsupported parameter dtype {stored}")
    log.info(
        "convert: loading %s (%s, %d layers, vocab %d, saved with %d padded rows) at TP=1/PP=1",
        ckpt,
        arch.model_type,
        arch.num_layers,
        arch.vocab_size,
        emb.global_shape[0],
    )
    with single_process_world():
        chunks = _build_tp1(arch, stored, padded_vocab=int(emb.global_shape[0]))
        check_checkpoint_matches(ckpt, chunks, arch.vocab_size, tensors)
        load_model_only(ckpt, chunks)
        full = gather_full_state_dict(chunks, arch)
    hf_sd = megatron_to_hf_state_dict(full, arch)
    out_dtype = stored
    if dtype is not None:
        out_dtype = {v: k for k, v in _DTYPE_NAMES.items()}.get(dtype) or _bad_dtype(dtype)
        hf_sd = {k: v.to(out_dtype) for k, v in hf_sd.items()}
    config = dict(hf_config)
    config["torch_dtype"] = _HF_DTYPE[_DTYPE_NAMES[out_dtype]]
    tokenizer_dir = meta_dir if _has_tokenizer(meta_dir) else None
    if tokenizer_dir is None:
        log.warning("convert: %s has no tokenizer files; the HF directory will hold weights and config only", meta_dir)
    save_hf(dst, hf_sd, config, tokenizer_dir=tokenizer_dir)
    log.info("convert: wrote %d tensors to %s", len(hf_sd) - int(arch.tie_word_embeddings), dst)
    return dst


def _bad_dtype(name: str) -> torch.dtype:
    raise SpecError(f"--dtype: '{name}' is not one of {', '.join(_DTYPE_NAMES.values())}")


def _weights_dtype(hf_dir: Path) -> torch.dtype:
    """The dtype of the HF embedding table (the model is built in it, so conversion is lossless)."""
    from megatron_camopd.backend.hf_mapping import read_hf_state_dict

    emb = read_hf_state_dict(hf_dir, keep=lambda k: k == "model.embed_tokens.weight")
    if not emb:
        raise CheckpointError(f"{hf_dir}: no 'model.embed_tokens.weight' in the safetensors files")
    dtype = emb["model.embed_tokens.weight"].dtype
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"{hf_dir}: unsupported weight dtype {dtype}")
    return dtype


def hf_to_checkpoint(
    src: PathLike, dst: PathLike, tp: int = 1, pp: int = 1, tokenizer: PathLike | None = None, dtype: str | None = None
) -> Path:
    """HF model directory -> checkpoint root ``dst`` (``hf/`` + ``iter_0000000/``); returns the iter directory.

    ``tp``/``pp``: the layout training will use; it is validated against the architecture now (the checkpoint
    itself is saved at TP=1/PP=1 and resharded by dist_checkpointing on load). ``tokenizer``: a tokenizer
    directory when ``src`` holds none. An existing ``dst`` must describe the same architecture.
    """
    from megatron_camopd.backend.checkpoint import META_DIR, save_checkpoint, write_model_meta
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch, transformer_config

    src, dst = Path(src), Path(dst)
    hf_config = _read_hf_config(src)
    arch = ModelArch.from_hf_config(hf_config, source=str(src / "config.json"))
    if tp < 1 or pp < 1:
        raise SpecError(f"--tp/--pp must be >= 1, got tp={tp}, pp={pp}")
    transformer_config(arch, tp=tp, pp=pp)  # SpecError when the layout does not fit the architecture
    tok_dir = Path(tokenizer) if tokenizer is not None else src
    if tokenizer is not None and not _has_tokenizer(tok_dir):
        raise SpecError(f"--tokenizer: {tok_dir} holds no tokenizer files")
    tok_size = check_tokenizer_fits(tok_dir, arch.vocab_size)
    if tok_size is None:
        log.warning("convert: %s has no tokenizer files; pass --tokenizer DIR so training finds one", src)
    existing = dst / META_DIR / "config.json"
    if existing.is_file():
        theirs = ModelArch.from_hf_config(_read_hf_config(dst / META_DIR), source=str(existing))
        if theirs != arch:
            diff = [f.name for f in dataclasses.fields(arch) if getattr(arch, f.name) != getattr(theirs, f.name)]
            raise CheckpointError(
                f"{dst}: already holds a checkpoint for another architecture "
                f"(differs in {', '.join(diff)}); choose an empty destination"
            )
    weights_dtype = (
        _weights_dtype(src)
        if dtype is None
        else ({v: k for k, v in _DTYPE_NAMES.items()}.get(dtype) or _bad_dtype(dtype))
    )
    log.info(
        "convert: %s (%s, %d layers, vocab %d, %s) -> %s",
        src,
        arch.model_type,
        arch.num_layers,
        arch.vocab_size,
        _DTYPE_NAMES[weights_dtype],
        dst,
    )
    with single_process_world():
        chunks = _build_tp1(arch, weights_dtype)
        load_hf_weights(chunks, src, arch, tp_rank=0, tp_size=1)
        dst.mkdir(parents=True, exist_ok=True)
        write_model_meta(dst, hf_config, tok_dir if tok_size is not None else None)
        path = save_checkpoint(
            dst, 0, chunks, optimizer=None, scheduler=None, train_state={"converted_from": str(src.resolve())}
        )
    log.info("convert: wrote %s (loadable at tp=%d, pp=%d and any other layout)", path, tp, pp)
    return path
