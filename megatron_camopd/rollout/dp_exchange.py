"""The step batch's exchange over data parallelism: what every DP rank must see of the other ranks' samples.

Selection and calibration are batch-level, so every rank runs the method over the whole step batch; but each
rank trains on its own slice only (`rollout/assemble.py` `dp_rows`), and the teacher's top-k tensors of a sample are
read
only for the rank's own rows (the top-k loss, SelecTKD's token weights), except for two per-sample facts the
batch-level method uses on every row: whether the top-k log-probs are finite on the response (rows with a
non-finite value are dropped) and, for SelecTKD, how many response tokens the top-k ids accept (its batch
acceptance rate). So the exchange sends each sample without its top-k tensors, with those two scalars; the
receiving rank rebuilds stand-in top-k rows of the same shape that give the method exactly the same validity,
acceptance count and hence the same training signals for every row it trains on (bitwise; a test compares with
the full exchange). The top-k tensors are k * (8 + 4) bytes per response token (k = 16: 192 B, ~3 GB per step
at 32k tokens and 512 samples), the rest of a sample ~30 B per token; stand-in rows of other ranks' samples are
never trained on.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_camopd.teachers.base import TeacherScores


@dataclasses.dataclass(frozen=True)
class TopkSummary:
    """What the batch-level method reads of a sample's top-k rows (see the module docstring)."""

    k: int  # top-k width (stand-ins keep the shape)
    finite: bool  # every top-k log-prob of the response is finite
    accepted: int  # response tokens whose student top-1 is among the first `accept_k` teacher ids


def summarize(sample, accept_k: int | None) -> TopkSummary | None:
    sc = sample.scores
    if sc is None or sc.topk_ids is None:
        return None
    accepted = 0
    top1 = sample.rollout.top1 if sample.rollout is not None else None
    if accept_k and top1 is not None:
        n = min(sc.topk_ids.shape[0], len(top1))
        t1 = torch.as_tensor(top1[:n], dtype=torch.long)
        accepted = int((sc.topk_ids[:n, :accept_k] == t1.unsqueeze(-1)).any(-1).sum())
    return TopkSummary(int(sc.topk_ids.shape[1]), bool(torch.isfinite(sc.topk_logprobs).all()), accepted)


def without_topk(sample):
    """A shallow copy of `sample` whose scores carry no top-k tensors."""
    sc = sample.scores
    if sc is None or sc.topk_ids is None:
        return sample
    return dataclasses.replace(sample, scores=TeacherScores(sc.logprobs))


def with_standin_topk(sample, summary: TopkSummary | None):
    """`sample` with stand-in top-k rows of the original shape: log-probs 0 (one NaN when the original had a
    non-finite value), ids -1 except the student's top-1 in column 0 of the first `accepted` positions."""
    if summary is None:
        return sample
    lp = sample.scores.logprobs
    n = lp.shape[0]
    ids = torch.full((n, summary.k), -1, dtype=torch.long)
    lps = torch.zeros((n, summary.k), dtype=torch.float32)
    if summary.accepted:
        ids[: summary.accepted, 0] = torch.as_tensor(sample.rollout.top1[: summary.accepted], dtype=torch.long)
    if not summary.finite and n:
        lps[0, 0] = float("nan")
    return dataclasses.replace(sample, scores=TeacherScores(lp, ids, lps))


def exchange_samples(local: list, dp_rank: int, dp_size: int, group, accept_k: int | None) -> list:
    """All-gather the step batch over DP: this rank's samples as they are, the others' without top-k tensors
    (stand-ins rebuilt here). Collective over `group`; returns the samples in rank order."""
    light = [(without_topk(s), summarize(s, accept_k)) for s in local]
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, light, group=group)
    out = []
    for rank, part in enumerate(gathered):
        out.extend(local if rank == dp_rank else [with_standin_topk(s, summary) for s, summary in part])
    return out
