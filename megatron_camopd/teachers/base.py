"""The teacher interface: what the training loop asks of any teacher, and what a teacher server computes.

A *teacher* scores ("prefills") a token sequence the student produced and returns, for every response position,
the log-probability of the token actually there (and optionally its own top-k tokens). Teachers can be remote
(`HttpTeacher`, speaking SGLang's `/generate` scoring subset) or in-process (a Megatron model); both implement
`Teacher`. A *scorer* is the server-side computation behind `camopd serve-teacher`: full-sequence input
log-probs at temperature 1, for a batch of sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import TeacherError


@dataclass
class TeacherScores:
    """Scores of one sequence's response part.

    `logprobs[j] = log p(ids[start + j] | ids[:start + j])` for `j in [0, len(ids) - start)`, fp32.
    `topk_ids[j, :]` / `topk_logprobs[j, :]` are the teacher's K most likely tokens at that same position
    (descending log-prob), or `None` when top-k was not requested.
    """

    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.logprobs.dim() != 1:
            raise TeacherError(f"TeacherScores.logprobs must be 1-D, got shape {tuple(self.logprobs.shape)}")
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise TeacherError("TeacherScores: topk_ids and topk_logprobs must be both set or both None")
        if self.topk_ids is not None and self.topk_logprobs is not None:
            n = self.logprobs.shape[0]
            if (
                self.topk_ids.dim() != 2
                or self.topk_ids.shape[0] != n
                or self.topk_ids.shape != self.topk_logprobs.shape
            ):
                raise TeacherError(
                    f"TeacherScores: top-k shapes {tuple(self.topk_ids.shape)} / {tuple(self.topk_logprobs.shape)}"
                    f" do not match {n} response positions"
                )

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def sliced(self, begin: int) -> TeacherScores:
        """The scores of positions `begin..` (used to cut a full-sequence result down to the response)."""
        return TeacherScores(
            logprobs=self.logprobs[begin:].contiguous(),
            topk_ids=None if self.topk_ids is None else self.topk_ids[begin:].contiguous(),
            topk_logprobs=None if self.topk_logprobs is None else self.topk_logprobs[begin:].contiguous(),
        )


@runtime_checkable
class Teacher(Protocol):
    """A teacher the training loop can ask for scores. `start` is the index of the first response token (>= 1)."""

    name: str

    async def score(self, ids: list[int], start: int, top_k: int | None = None) -> TeacherScores:
        """Scores of `ids[start:]` given their prefixes."""
        ...

    def score_batch(self, seqs: list[list[int]], starts: list[int], top_k: int | None = None) -> list[TeacherScores]:
        """Synchronous helper: scores of every sequence, in order; raises `TeacherError` if any sample failed."""
        ...

    def model_info(self) -> dict[str, Any]:
        """`{"model_path": ..., "tokenizer_path": ..., "tokenizer_fingerprint": ... (or None)}`."""
        ...

    def close(self) -> None:
        """Release connections, threads and background tasks. Idempotent."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """The computation behind a teacher server (synchronous; the server runs it in a worker thread).

    `score(seqs, top_k)` returns one `TeacherScores` per sequence covering positions `1..len(seq)-1`
    (i.e. `start = 1`: `logprobs[j] = log p(seq[j + 1] | seq[:j + 1])`), computed at temperature 1.
    """

    def score(self, seqs: list[list[int]], top_k: int | None) -> list[TeacherScores]: ...

    def vocab_size(self) -> int:
        """Number of valid token ids (`0 <= id < vocab_size`)."""
        ...

    def token_texts(self, ids: list[int]) -> list[str | None]:
        """Per-token text (`tokenizer.decode([id])`), or `None` entries when no tokenizer is known."""
        ...

    def model_info(self) -> dict[str, Any]:
        """`{"model_path", "tokenizer_path", "tokenizer_fingerprint"}` (values may be None)."""
        ...


def check_start(ids: list[int], start: int, where: str) -> None:
    """Validate a (sequence, response start) pair: `1 <= start <= len(ids)`."""
    if not isinstance(start, int) or start < 1 or start > len(ids):
        raise TeacherError(f"{where}: response start {start!r} must satisfy 1 <= start <= len(ids) = {len(ids)}")
