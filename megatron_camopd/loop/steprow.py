"""What a training step reports: the metrics row of `metrics.jsonl`, and the opt-in gradient diagnostics
(`Diagnostics`: which steps run them, the other branch's latest batch they compare against, their row).

Every row has `step`, `branch`, `loss`, `grad_norm`, `lr`, `selected_fraction`, `mean_gap`, `reverse_kl`,
`entropy`, `tokens_per_s` plus the method's own metrics (per-branch selected fraction, gap-vs-length Spearman,
acceptance rate, margins...), rollout statistics (`rollout_failed`; with served rollouts `stale_samples`,
`stale_dropped` and the weight sync's `weight_sync_s`, `weight_sync_bytes`) and timings; the training loop adds
`rollout_wait_s`, `weight_wait_s`, `rollout_staleness_max` and `rollout_staleness_mean` (rollout/pipeline.py).
"""

from __future__ import annotations

import torch

from megatron_camopd.algo.camopd import gap_scores, mass_target_select
from megatron_camopd.algo.diagnostics import (
    carries_conflict,
    coherence_report,
    diagnostics_due,
    length_summary,
    selection_precision,
    split_halves,
)
from megatron_camopd.backend import sample_grads as gd
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


def conflict_token_ids(tokenizer, strings: list[str] | None) -> frozenset[int] | None:
    """The token ids of `logging.diagnostics_conflict_tokens` (None when unset)."""
    return frozenset(t for x in strings for t in tokenizer.encode_text(x)) if strings else None


def _per_sample_batches(step: StepBatch, full, rows, loss_spec, pad_id: int, n: int):
    """One one-row batch per candidate sample, each counted (a sample dropped by selection keeps its full-batch
    gradient), then zero-weight filler batches up to `n` (every DP rank runs `n` passes: see
    backend/sample_grads.py)."""
    topk = loss_spec.loss == "topk"
    out = []
    for i in rows:
        b = step.megatron(pad_id, 1, topk=topk, rows=[i], signals=full)
        b["sample_weight"][0] = 1.0
        out.append(b)
    out += [step.megatron(pad_id, 1, topk=topk, rows=[], signals=full) for _ in range(n - len(rows))]
    return out


def _halves(part: StepBatch, rows: list[int], gen, pad_id: int, micro_batch_size: int, topk: bool) -> tuple:
    """This rank's selected rows of a branch split at random into two half batches (split-half reliability),
    each padded to the largest over DP (every rank runs as many micro-batches)."""
    chosen = [i for i in rows if part.signals is not None and float(part.signals.sample_weight[i]) > 0]
    out = []
    for h in split_halves(len(chosen), gen):
        r = [chosen[j] for j in h]
        out.append(part.megatron(pad_id, micro_batch_size, topk=topk, rows=r, min_rows=gd.dp_max(len(r))))
    return tuple(out)


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
    null_draws: int = 200,
    sketch_dim: int = 1 << 21,
    conflict_ids: frozenset[int] | None = None,
    seed: int = 0,
) -> dict:
    """The step's gradient diagnostics at the current parameters, every key labelled by branch where it is one
    branch's (`diag_<name>/<branch>`): per branch in the step (both in a mixed step), coherence and GCG against the
    size-matched random-subset null from at most `max_samples` (`logging.diagnostics_samples`; None: all)
    per-sample gradients per rank, for the method's selection and for the gap selection CaMOPD would make, and the
    selection's precision on the samples that carry the conflict (`conflict_ids`); then the cross-branch dot
    product, cosine, norm ratio, counteracted fraction, split-half reliabilities, corrected cosine and per-tensor
    breakdown (backend/sample_grads.py). `seed` seeds the nulls and the half splits."""
    row: dict = {}
    sig, signals, rows = step.sig, step.signals, step.rows
    assert sig is not None and signals is not None, "diagnostics need an on-policy step"
    full = method.without_selection().prepare(sig)  # the full candidate batch: dropped samples keep advantages
    rho = {"general": getattr(method, "rho_g", 0.8), "domain": getattr(method, "rho_d", 0.8)}
    for b in ("general", "domain") if branch == "mixed" else (branch,):
        every = [i for i in range(len(sig.branch)) if sig.branch[i] == b]  # the whole batch's rows of b
        if not every:
            continue
        kept = signals.sample_weight[every] > 0
        delta = (sig.teacher_lp - sig.rollout_lp)[every]
        gap_keep = mass_target_select(gap_scores(delta, sig.mask[every], b), rho[b]).keep
        pos = {i: j for j, i in enumerate(every)}
        valid = [i for i in rows if sig.branch[i] == b and torch.isfinite(sig.teacher_lp[i]).all()]
        valid = valid[:max_samples]  # None: all
        n_passes = gd.dp_max(len(valid))  # the ranks' counts differ (uneven slices, unscored samples)
        labels = [[bool(kept[pos[i]]), bool(gap_keep[pos[i]])] for i in valid]
        labels += [[False, False]] * (n_passes - len(valid))
        per = _per_sample_batches(step, full, valid, loss_spec, pad_id, n_passes)
        k, lab = gd.per_sample_gram(engine, per, labels, loss_spec, sketch_dim=sketch_dim, seed=seed)
        rep = coherence_report(k, lab[:, 0], lab[:, 1], null_draws, seed) if k.shape[0] else {}
        if conflict_ids:
            ids = [step.samples[i].rollout.response_ids for i in every]
            conflict = torch.tensor([carries_conflict(r, b, conflict_ids) for r in ids])
            rep.update({f"sel_{key}": v for key, v in selection_precision(kept, conflict).items()})
            rep.update({f"gap_sel_{key}": v for key, v in selection_precision(gap_keep, conflict).items()})
        row.update({f"diag_{key}/{b}": v for key, v in rep.items()})
    # cross-branch: the two halves of a mixed batch, or the active batch vs the other branch's latest batch
    other = "domain" if branch == "general" else "general"
    if branch == "mixed":
        parts = {b: (step, [i for i in rows if sig.branch[i] == b]) for b in ("general", "domain")}
    elif other in cache:
        parts = {branch: (step, rows), other: (cache[other], cache[other].rows)}
    else:
        return row
    gen = torch.Generator().manual_seed(seed)
    topk = loss_spec.loss == "topk"
    halves = {b: _halves(p, r, gen, pad_id, micro_batch_size, topk) for b, (p, r) in parts.items()}
    row.update({f"diag_{key}": v for key, v in gd.cross_branch(engine, halves, loss_spec).items()})
    return row


class Diagnostics:
    """The training loop's gradient diagnostics (`logging.diagnostics*`): `due(step)` says which steps run them,
    `row(...)` runs them on a step's batch when due and remembers that batch as its branch's latest (the
    cross-branch instruments compare the active batch with the other branch's); off (`logging.diagnostics:
    false`), `row` is a no-op."""

    def __init__(self, logging_cfg, schedule, seed: int, *, pad_id: int, micro_batch_size: int, tokenizer=None):
        self.cfg, self.schedule, self.seed = logging_cfg, schedule, seed
        self.pad_id, self.micro_batch_size = pad_id, micro_batch_size
        strings = logging_cfg.diagnostics_conflict_tokens
        self.conflict_ids = conflict_token_ids(tokenizer, strings) if tokenizer is not None else None
        self._latest: dict[str, StepBatch] = {}  # branch -> its latest batch

    def due(self, step: int) -> bool:
        """Whether step `step` (0-based) runs the diagnostics: `logging.diagnostics_interval` (and
        `diagnostics_interval_domain` for domain steps) counted per branch of the schedule from
        `diagnostics_start`."""
        lg = self.cfg
        return diagnostics_due(
            step,
            self.schedule.at,
            self.schedule.period,
            lg.diagnostics_interval,
            lg.diagnostics_interval_domain,
            lg.diagnostics_start,
        )

    def row(self, engine, method, batch: StepBatch, loss_spec, branch: str, step: int) -> dict:
        """The diagnostics of step `step` when due (else {}); `batch` becomes `branch`'s latest."""
        if not self.cfg.diagnostics:
            return {}
        out = {}
        if self.due(step):
            lg = self.cfg
            out = diagnostics_row(
                engine,
                method,
                batch,
                loss_spec,
                branch,
                self._latest,
                pad_id=self.pad_id,
                micro_batch_size=self.micro_batch_size,
                max_samples=lg.diagnostics_samples,
                null_draws=lg.diagnostics_null_draws,
                sketch_dim=lg.diagnostics_sketch_dim,
                conflict_ids=self.conflict_ids,
                seed=self.seed * 1_000_003 + step,
            )
        self._latest[branch] = batch
        return out
