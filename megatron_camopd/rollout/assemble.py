"""Pack scored samples into tensors: the algorithm's response-aligned `SignalBatch` and Megatron's micro-batches.

Response-aligned `[B, T]`: column t is response token t of each sample (T = longest response), `mask` marks real
tokens. Megatron's layout `[B, L]` is aligned with the model's next-token positions: column j predicts
`tokens[:, j + 1]`, so response token t of a sample with prompt length P sits at column P - 1 + t.
A sample that failed scoring, or whose scores do not cover its response, gets an all-NaN teacher row: the
method drops it (sample_weight 0) and counts it, so no sample disappears without a trace.

`StepBatch` is the one seam between a step's samples and Megatron: the DP slice (`dp_rows`), the micro-batch
tensors and the teacher top-k, used alike by the training step, SFT and the gradient diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_camopd.algo.methods import SignalBatch, TrainSignals


def _pad2(rows: list[torch.Tensor], width: int, fill: float, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.to(dtype)
    return out


def signal_batch(samples, teacher_weights: dict[str, float]) -> SignalBatch:
    """The method's input for the whole step batch."""
    n_resp = [len(s.rollout.response_ids) for s in samples]
    width = max(max(n_resp), 1)
    nan = float("nan")

    def teacher_row(s) -> torch.Tensor:
        n = len(s.rollout.response_ids)
        if s.error is not None or s.scores is None or len(s.scores) != n:
            return torch.full((n,), nan)
        return s.scores.logprobs

    mask = _pad2([torch.ones(n) for n in n_resp], width, 0.0, torch.float32)
    batch: dict[str, Any] = dict(
        mask=mask,
        teacher_lp=_pad2([teacher_row(s) for s in samples], width, 0.0, torch.float32),
        rollout_lp=_pad2([s.rollout.logprobs for s in samples], width, 0.0, torch.float32),
        branch=[s.branch if s.branch != "all" else "general" for s in samples],
        entropy=(
            None
            if any(s.rollout.entropy is None for s in samples)  # not computed (served rollouts)
            else _pad2([s.rollout.entropy for s in samples], width, 0.0, torch.float32)
        ),
        student_top1=_pad2([s.rollout.top1 for s in samples], width, 0, torch.long),
        teacher_weight=torch.tensor([float(teacher_weights.get(s.teacher, 1.0)) for s in samples]),
    )
    ok = [s.scores is not None and s.error is None and s.scores.topk_ids is not None for s in samples]
    if any(ok):
        k = next(s.scores.topk_ids.shape[1] for s, good in zip(samples, ok) if good)
        ids = torch.zeros((len(samples), width, k), dtype=torch.long)
        lps = torch.full((len(samples), width, k), nan)
        for i, (s, good) in enumerate(zip(samples, ok)):
            if good:
                n = s.scores.topk_ids.shape[0]
                ids[i, :n], lps[i, :n] = s.scores.topk_ids, s.scores.topk_logprobs
        batch.update(teacher_topk_ids=ids, teacher_topk_lp=lps.masked_fill(mask.unsqueeze(-1) == 0, 0.0))
    if all(s.ref_lp is not None for s in samples):
        batch["ref_lp"] = _pad2([s.ref_lp for s in samples], width, 0.0, torch.float32)
    if all(s.reward is not None for s in samples):
        batch["reward"] = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        batch["group"] = torch.tensor([s.group for s in samples], dtype=torch.long)
    return SignalBatch(**batch)


def train_batch(
    samples,
    signals: TrainSignals | None,
    rows: list[int],
    pad_id: int,
    multiple: int,
    width: int | None = None,
    sft: bool = False,
    min_rows: int = 1,
) -> dict[str, torch.Tensor]:
    """Megatron micro-batch tensors for `rows` of the step batch, padded with zero-weight rows to at least
    `min_rows` rows and to a multiple of `multiple`.

    `width` is the tensors' width (at least the longest row); `seq_len` [n_rows] holds each row's real length, so
    every micro-batch runs at its own longest row's width, padded as the model's layout needs.
    """
    seqs = [samples[i].rollout.ids for i in rows]
    width = width or max(len(s) for s in seqs)
    n_rows = -(-max(len(rows), min_rows, 1) // multiple) * multiple
    tokens = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), pad_id, dtype=torch.long)
    f32 = torch.float32
    out = {
        k: torch.zeros((n_rows, width), dtype=f32) for k in ("loss_mask", "rollout_lp", "advantages", "token_weight")
    }
    out["sample_weight"] = torch.zeros(n_rows, dtype=f32)
    for r, i in enumerate(rows):
        s = samples[i]
        ids = torch.tensor(s.rollout.ids, dtype=torch.long)
        tokens[r, : len(ids)] = ids
        labels[r, : len(ids) - 1] = ids[1:]
        p, n = len(s.prompt.prompt_ids), len(s.rollout.response_ids)
        cols = slice(p - 1, p - 1 + n)
        out["loss_mask"][r, cols] = 1.0
        out["rollout_lp"][r, cols] = s.rollout.logprobs
        if sft:
            out["sample_weight"][r] = 1.0
            continue
        assert signals is not None, "an on-policy batch carries the method's signals"
        out["advantages"][r, cols] = signals.advantages[i, :n]
        out["token_weight"][r, cols] = signals.token_weight[i, :n]
        out["sample_weight"][r] = signals.sample_weight[i]
    out.update(tokens=tokens, labels=labels)
    # each row's length: a micro-batch runs at its own longest row's width (backend/forward.split_microbatches)
    out["seq_len"] = torch.zeros(n_rows, dtype=torch.long)
    out["seq_len"][: len(rows)] = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if signals is not None and signals.seq_scale is not None:
        out["seq_scale"] = torch.zeros(n_rows, dtype=f32)
        out["seq_scale"][: len(rows)] = signals.seq_scale[rows]
    return out


def add_topk(batch: dict[str, torch.Tensor], samples, rows: list[int], sig: SignalBatch) -> None:
    """Teacher top-k ids / log-probs in Megatron's layout (for the top-k loss)."""
    n_rows, width = batch["tokens"].shape
    if sig.teacher_topk_ids is None or sig.teacher_topk_lp is None:
        raise ValueError("add_topk: the teachers returned no top-k log-probs (method.topk / the top-k loss)")
    k = sig.teacher_topk_ids.shape[-1]
    ids = torch.zeros((n_rows, width, k), dtype=torch.long)
    lps = torch.zeros((n_rows, width, k), dtype=torch.float32)
    for r, i in enumerate(rows):
        s = samples[i]
        p, n = len(s.prompt.prompt_ids), len(s.rollout.response_ids)
        ids[r, p - 1 : p - 1 + n] = sig.teacher_topk_ids[i, :n]
        lps[r, p - 1 : p - 1 + n] = torch.nan_to_num(sig.teacher_topk_lp[i, :n], nan=0.0)
    batch["topk_ids"], batch["topk_lp"] = ids, lps


def dp_rows(n: int, dp_rank: int, dp_size: int) -> list[int]:
    """This DP rank's contiguous rows of an `n`-sample step batch (every rank trains on its own slice only).
    When `dp_size` does not divide `n` the first `n % dp_size` ranks get one row more: the Megatron tensors of
    every slice are padded to the largest slice (`StepBatch.megatron`), so every rank runs the same passes."""
    return np.array_split(np.arange(n), dp_size)[dp_rank].tolist()


@dataclass
class StepBatch:
    """One step's samples with the method's signals and this DP rank's rows; `megatron()` packs any rows of it.

    Every DP rank's own slice is packed to `rank_rows` rows (the largest slice; zero-weight filler rows on the
    others), so each rank runs the same number of micro-batches: FP8's delayed scaling all-reduces amaxes over
    TP x DP at every forward, and a rank with one micro-batch fewer would leave the others waiting (NCCL hang)."""

    samples: list
    sig: SignalBatch | None  # the method's input (None for SFT)
    signals: TrainSignals | None  # the method's output (None for SFT)
    rows: list[int]  # this DP rank's rows
    rank_rows: int = 1  # rows of the largest DP slice: ceil(len(samples) / dp_size)

    @classmethod
    def of(
        cls, samples: list, sig: SignalBatch | None, signals: TrainSignals | None, dp_rank: int, dp_size: int
    ) -> StepBatch:
        return cls(samples, sig, signals, dp_rows(len(samples), dp_rank, dp_size), -(-len(samples) // dp_size))

    @property
    def width(self) -> int:
        """Tensor width of every micro-batch of this step: its longest sequence."""
        return max(len(s.rollout.ids) for s in self.samples)

    def megatron(
        self,
        pad_id: int,
        multiple: int,
        *,
        topk: bool = False,
        rows: list[int] | None = None,
        signals: TrainSignals | None = None,
        min_rows: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Megatron tensors of `rows` (default: this rank's, padded to `rank_rows`), with the teacher top-k when
        the loss needs it; `signals` overrides the step's (the diagnostics' unselected batch); `min_rows`: pad
        to at least that many rows (default: `rank_rows` for this rank's own rows, else none)."""
        if min_rows is None:
            min_rows = self.rank_rows if rows is None else 1
        rows = self.rows if rows is None else rows
        signals = self.signals if signals is None else signals
        batch = train_batch(
            self.samples, signals, rows, pad_id, multiple, self.width, sft=signals is None, min_rows=min_rows
        )
        if topk:
            assert self.sig is not None
            add_topk(batch, self.samples, rows, self.sig)
        return batch
