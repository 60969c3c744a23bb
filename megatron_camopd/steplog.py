"""What a training step reports: the metrics row of `metrics.jsonl`, and the opt-in gradient diagnostics.

Every row has `step`, `branch`, `loss`, `grad_norm`, `lr`, `selected_fraction`, `mean_gap`, `reverse_kl`,
`entropy`, `tokens_per_s` plus the method's own metrics (per-branch selected fraction, gap-vs-length Spearman,
acceptance rate, margins...), rollout statistics and timings.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_camopd.algo.diagnostics import length_summary
from megatron_camopd.backend import diagnostics as gd
from megatron_camopd.rollout.assemble import add_topk, train_batch


def step_row(step: int, branch: str, samples, sig, signals, out: dict, t_rollout: float, t_train: float) -> dict:
    n_tokens = int(sig.mask.sum())
    lengths = sig.mask.sum(1)
    row = {"step": step, "branch": branch, **out, **signals.metrics}
    row.update(
        selected_fraction=float(signals.sample_weight.mean()),
        response_len_mean=float(lengths.float().mean()),
        finished_stop=sum(s.rollout.finish_reason == "stop" for s in samples) / max(len(samples), 1),
        teacher_failed=sum(s.error is not None for s in samples),
        rollout_s=t_rollout, train_s=t_train,
        tokens_per_s=n_tokens / max(t_rollout + t_train, 1e-9),
    )
    if sig.reward is not None:
        row["reward_mean"] = float(sig.reward.mean())
    row.update(length_summary(lengths, signals.sample_weight > 0))
    return row


def _per_sample_batches(session, samples, signals, sig, rows, width, loss_spec, force_keep: bool):
    out = []
    for i in rows:
        b = train_batch(samples, signals, [i], session.tokenizer.pad_id, session.spec.train.micro_batch_size, width)
        if force_keep and signals.metrics.get("n_nan_dropped", 0) == 0:
            b["sample_weight"][0] = 1.0
        if loss_spec.kind == "topk":
            add_topk(b, samples, [i], sig)
        out.append(b)
    return out


def diagnostics_row(session, samples, signals, sig, batch, rows, width, loss_spec, branch, cache) -> dict:
    """Cross-branch gradient dot/cosine and within-branch coherence/GCG at the current parameters."""
    engine = session.engine
    row: dict = {}
    valid = [i for i in rows if torch.isfinite(sig.teacher_lp[i]).all()]
    keep = [bool(signals.sample_weight[i] > 0) for i in valid]
    # the full candidate batch: the same method without selection (dropped samples keep their advantages)
    method = session.method
    full = dataclasses.replace(method, selection=False).prepare(sig) if hasattr(method, "selection") else signals
    per = _per_sample_batches(session, samples, full, sig, valid, width, loss_spec, force_keep=True)
    row.update({f"diag_{k}": v for k, v in gd.coherence_stats(engine, per, keep, loss_spec).items()})
    # cross-branch: the active batch vs the latest batch of the other branch (mixed: the two halves)
    if branch == "mixed":
        parts = {b: [i for i in rows if sig.branch[i] == b] for b in ("general", "domain")}
        if all(parts.values()):
            g = {}
            for b, r in parts.items():
                part = train_batch(samples, signals, r, session.tokenizer.pad_id,
                                   session.spec.train.micro_batch_size, width)
                if loss_spec.kind == "topk":
                    add_topk(part, samples, r, sig)
                g[b] = gd.branch_grad(engine, part, loss_spec)
            row["diag_grad_dot"], row["diag_grad_cos"] = gd.dot_cosine(engine, g["general"], g["domain"])
    else:
        other = "domain" if branch == "general" else "general"
        if other in cache:
            o_samples, o_signals, o_sig = cache[other]
            o_rows = [i for i in range(len(o_samples))][session.dp_rank::session.dp_size]
            o_width = max(len(s.rollout.ids) for s in o_samples)
            o_batch = train_batch(o_samples, o_signals, o_rows, session.tokenizer.pad_id,
                                  session.spec.train.micro_batch_size, o_width)
            if loss_spec.kind == "topk":
                add_topk(o_batch, o_samples, o_rows, o_sig)
            g_here = gd.branch_grad(engine, batch, loss_spec)
            g_other = gd.branch_grad(engine, o_batch, loss_spec)
            g = {branch: g_here, other: g_other}
            row["diag_grad_dot"], row["diag_grad_cos"] = gd.dot_cosine(engine, g["general"], g["domain"])
    return row
