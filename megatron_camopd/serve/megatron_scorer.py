"""A `Scorer` over a checkpoint of this project (Megatron `dist_checkpointing`), for `camopd serve-teacher`.

Teachers trained or converted by camopd live as a checkpoint root (`hf/config.json` + tokenizer files, and
`iter_*/`). Serving them needs no conversion back to HF: this scorer builds the real megatron-core GPTModel in a
single process (TP=1, PP=1; CPU runtime on machines without CUDA), loads the weights with `load_model_only`
(resharding from whatever TP/PP the checkpoint was saved at) and scores through the very code the in-process
teacher uses (`teachers.inprocess.MegatronTeacher`), so served and in-process log-probs agree. It is safe to call
from several threads at once (the server's workers): nothing of the model changes while scoring.
`load_any_scorer(DIR)` picks this scorer or the HF one by what DIR contains (megatron-core is imported only for
the former).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..data.tokenizer import Tokenizer
from ..errors import CheckpointError
from ..teachers.base import TeacherScores

if TYPE_CHECKING:
    from ..teachers.inprocess import MegatronTeacher


class MegatronScorer:
    """Full-sequence input log-probs of a frozen Megatron model, scored in chunks of `micro_batch_size`."""

    def __init__(
        self,
        teacher: MegatronTeacher,
        tokenizer: Tokenizer | None,
        *,
        model_path: str,
        tokenizer_path: str | None,
        micro_batch_size: int = 8,
    ) -> None:
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.micro_batch_size = max(1, int(micro_batch_size))
        # every chunk scored below has at most this many rows, so forward_collect runs it as one micro-batch;
        # set once here: the server scores on several threads at a time
        self.teacher.micro_batch_size = self.micro_batch_size
        self.context_length = int(teacher.arch.max_position_embeddings)  # the server's prompt + output limit
        self._info = {
            "model_path": model_path,
            "tokenizer_path": tokenizer_path,
            "tokenizer_fingerprint": tokenizer.fingerprint() if tokenizer is not None else None,
        }

    def score(self, seqs: list[list[int]], top_k: int | None) -> list[TeacherScores]:
        from ..backend.cpu_runtime import activate_cpu_runtime

        activate_cpu_runtime()  # torch function modes are per thread; the server scores in a worker thread
        out: list[TeacherScores] = []
        for i in range(0, len(seqs), self.micro_batch_size):
            chunk = seqs[i : i + self.micro_batch_size]
            out.extend(self.teacher.score_batch(chunk, [1] * len(chunk), top_k))
        return out

    def vocab_size(self) -> int:
        return int(self.teacher.arch.vocab_size)

    def token_texts(self, ids: list[int]) -> list[str | None]:
        if self.tokenizer is None:
            return [None] * len(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    def model_info(self) -> dict[str, Any]:
        return dict(self._info)


def _init_single_process() -> None:
    """A private world of one (its own in-memory store: no port, never clashes with a trainer's MASTER_PORT)."""
    from ..backend.cpu_runtime import activate_cpu_runtime, init_distributed

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        activate_cpu_runtime()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_distributed(1, 1, None, rank=0, world_size=1, seed=0)


@dataclass
class FrozenModel:
    """A model loaded at TP=1 in this process for serving: the teacher scoring it, its tokenizer (None when the
    directory has no tokenizer files), where the weights and tokenizer came from and its config.json dir."""

    teacher: Any
    tokenizer: Tokenizer | None
    model_path: Path
    tok_dir: Path
    meta: Path


def load_frozen(
    path: str | Path, tokenizer_dir: str | Path | None = None, *, dtype: str = "fp32", micro_batch_size: int = 8
) -> FrozenModel:
    """A HF dir or a camopd checkpoint (a root -> its latest, or one `iter_*` dir) as a frozen TP=1 Megatron model
    in a private world of one. The architecture and, unless `tokenizer_dir` is given, the tokenizer come from
    the HF dir or the checkpoint's `hf/` dir."""
    # megatron-core is imported here, not at module level: serving a HF dir with transformers never pays for it
    from ..backend.checkpoint import find_model_meta, load_model_only, resolve_checkpoint
    from ..backend.engine import build_chunks
    from ..backend.hf_mapping import load_hf_weights
    from ..backend.model import ModelArch
    from ..teachers.inprocess import MegatronTeacher

    hf = checkpoint_kind(path) == "hf"
    meta = Path(path) if hf else find_model_meta(path)
    arch = ModelArch.from_hf_dir(meta)
    _init_single_process()
    chunks, _ = build_chunks(arch, 1, 1, None, dtype)
    if hf:
        model_path = Path(path)
        load_hf_weights(chunks, path, arch, 0, 1)
    else:
        model_path = resolve_checkpoint(path)
        load_model_only(model_path, chunks)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else meta
    has_tok = any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = Tokenizer.from_dir(tok_dir) if has_tok else None
    pad_id = tokenizer.pad_id if tokenizer is not None else 0  # padding sits after each sequence: never scored
    teacher = MegatronTeacher(
        "served",
        chunks,
        arch,
        pad_id=pad_id,
        micro_batch_size=micro_batch_size,
        source=str(model_path),
        tokenizer_fingerprint=None,
    )
    return FrozenModel(teacher, tokenizer, model_path, tok_dir, meta)


def load_megatron_scorer(
    checkpoint: str | Path, tokenizer_dir: str | Path | None = None, *, dtype: str = "fp32", micro_batch_size: int = 8
) -> MegatronScorer:
    """Load a camopd checkpoint (a root -> its latest, or one `iter_*` dir) as a TP=1 scorer in this process."""
    if checkpoint_kind(checkpoint) == "hf":
        raise CheckpointError(f"{checkpoint}: a HuggingFace directory, not a camopd checkpoint")
    m = load_frozen(checkpoint, tokenizer_dir, dtype=dtype, micro_batch_size=micro_batch_size)
    return MegatronScorer(
        m.teacher,
        m.tokenizer,
        model_path=str(m.model_path.resolve()),
        tokenizer_path=str(m.tok_dir.resolve()) if m.tokenizer is not None else None,
        micro_batch_size=micro_batch_size,
    )


def checkpoint_kind(path: str | Path) -> str:
    """`"hf"` for a HuggingFace dir (config.json), `"megatron"` for a camopd checkpoint root or `iter_*` dir."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint directory does not exist")
    if (p / "config.json").is_file():
        return "hf"
    iter_like = (p / "train_state.json").is_file() or (p / "latest").is_file() or any(p.glob("iter_*"))
    has_meta = (p / "hf" / "config.json").is_file() or (p.parent / "hf" / "config.json").is_file()
    if iter_like and has_meta:
        return "megatron"
    raise CheckpointError(
        f"{p}: neither a HuggingFace checkpoint (config.json + weights) nor a camopd checkpoint "
        f"(hf/config.json + iter_*/)"
    )


def load_any_scorer(path: str | Path, tokenizer_dir: str | Path | None = None, **kwargs: Any):
    """The scorer for `path`: `HFScorer` for a HF dir, `MegatronScorer` for a camopd checkpoint."""
    if checkpoint_kind(path) == "hf":
        from .hf_scorer import load_scorer

        return load_scorer(str(path), str(tokenizer_dir) if tokenizer_dir else None)
    return load_megatron_scorer(path, tokenizer_dir, **kwargs)
