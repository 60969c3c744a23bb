"""What a training step reports: the metrics row of `metrics.jsonl`, and the opt-in gradient diagnostics.

Every row has `step`, `branch`, `loss`, `grad_norm`, `lr`, `selected_fraction`, `mean_gap`, `reverse_kl`,
`entropy`, `tokens_per_s` plus the method's own metrics (per-branch selected fraction, gap-vs-length Spearman,
acceptance rate, margins...), rollout statistics (`rollout_failed`; with served rollouts `stale_samples`,
`stale_dropped` and the weight sync's `weight_sync_s`, `weight_sync_bytes`) and timings; the training loop adds
`rollout_wait_s`, `weight_wait_s`, `rollout_staleness_max` and `rollout_staleness_mean` (rollout/pipeline.py).
"""

from __future__ import annotations

import torch

from megatron_camopd.algo.diagnostics import length_summary
from megatron_camopd.backend import diagnostics as gd
from megatron_camopd.rollout.assemble import StepBatch
from megatron_camopd.rollout.staleness import stale_counts


def step_row(step: int, branch: str, samples, sig, signals, out: dict, t_rollout: float, t_train: float) -> dict:
    n_tokens = int(sig.mask.sum())
    lengths = sig.mask.sum(1)
    row = {"step": step, "branch": branch, **out, **signals.metrics}
    row.update(
        selected_fraction=float(signals.sample_weight.mean()),
        response_len_mean=float(lengths.float().mean()),
        finished_stop=sum(s.rollout.finish_reason == "stop" for s in samples) / max(len(samples), 1),
        teacher_failed=sum(s.error is not None and "not_scored" not in s.meta for s in samples),
        rollout_failed=sum(s.meta.get("not_scored") == "rollout" for s in samples),
        rollout_s=t_rollout,
        train_s=t_train,
        tokens_per_s=n_tokens / max(t_rollout + t_train, 1e-9),
    )
    row.update(stale_counts(samples))  # served rollouts: stale_samples (used), stale_dropped
    if sig.reward is not None:
        row["reward_mean"] = float(sig.reward.mean())
    row.update(length_summary(lengths, signals.sample_weight > 0))
    return row


def _per_sample_batches(step: StepBatch, full, rows, loss_spec, pad_id: int, micro_batch_size: int, n: int):
    """One batch per candidate sample, each counted (a sample dropped by selection keeps its full-batch gradient),
    then zero-weight filler batches up to `n` (every DP rank runs `n` passes: see backend/diagnostics.py)."""
    topk = loss_spec.loss == "topk"
    out = []
    for i in rows:
        b = step.megatron(pad_id, micro_batch_size, topk=topk, rows=[i], signals=full)
        b["sample_weight"][0] = 1.0
        out.append(b)
    out += [step.megatron(pad_id, micro_batch_size, topk=topk, rows=[], signals=full) for _ in range(n - len(rows))]
    return out


def diagnostics_row(
    engine,
    method,
    step: StepBatch,
    loss_spec,
    branch: str,
    cache: dict[str, StepBatch],
    *,
    pad_id: int,
    micro_batch_size: int,
    max_samples: int | None,
) -> dict:
    """Cross-branch gradient dot/cosine and within-branch coherence/GCG at the current parameters, from at most
    `max_samples` (`logging.diagnostics_samples`; None: all) per-sample gradients per rank."""
    row: dict = {}
    sig, signals, rows = step.sig, step.signals, step.rows
    assert sig is not None and signals is not None, "diagnostics need an on-policy step"
    valid = [i for i in rows if torch.isfinite(sig.teacher_lp[i]).all()]
    valid = valid[:max_samples]  # None: all
    n_passes = gd.dp_max(len(valid))  # the ranks' counts differ (uneven slices, unscored samples)
    keep = [bool(signals.sample_weight[i] > 0) for i in valid] + [False] * (n_passes - len(valid))
    # the full candidate batch: the same method without selection (dropped samples keep their advantages)
    full = method.without_selection().prepare(sig)
    per = _per_sample_batches(step, full, valid, loss_spec, pad_id, micro_batch_size, n_passes)
    row.update({f"diag_{k}": v for k, v in gd.coherence_stats(engine, per, keep, loss_spec).items()})
    # cross-branch: the two halves of a mixed batch, or the active batch vs the other branch's latest batch
    other = "domain" if branch == "general" else "general"
    if branch == "mixed":
        parts = {b: (step, [i for i in rows if sig.branch[i] == b]) for b in ("general", "domain")}
    elif other in cache:
        parts = {branch: (step, rows), other: (cache[other], cache[other].rows)}
    else:
        return row
    grads = {}
    for b, (part_step, r) in parts.items():  # every DP rank takes part, even with no rows of a branch,
        # with as many micro-batches as the rank with the most rows of it
        part = part_step.megatron(
            pad_id, micro_batch_size, topk=loss_spec.loss == "topk", rows=r, min_rows=gd.dp_max(len(r))
        )
        grads[b] = gd.branch_grad(engine, part, loss_spec, over_dp=True)
    if grads["general"][1] and grads["domain"][1]:
        row["diag_grad_dot"], row["diag_grad_cos"] = gd.dot_cosine(engine, grads["general"][0], grads["domain"][0])
    return row
