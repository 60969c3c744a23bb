"""Diagnostics of CaMOPD's claims (arXiv:2605.27115 §3.2, Eqs. (3)-(4)) and of the questions a reviewer asks of
them: does the gap score just track sequence length, and how coherent is vanilla MOPD by comparison?

Gradient geometry (cross-branch dot/cosine, within-branch coherence, coherence gain) on flat gradient vectors,
and selection statistics (selected fraction, gap-vs-length Spearman correlation, lengths of selected vs dropped
samples). Everything returns plain floats (``nan`` where undefined) so it can go straight to the metrics log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def grad_dot_cosine(g1: Tensor, g2: Tensor) -> tuple[float, float]:
    """``(<g1, g2>, cos(g1, g2))`` of two flat gradients (computed in float64; cosine nan if a norm is 0)."""
    a, b = g1.detach().flatten().double(), g2.detach().flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"gradient sizes differ: {a.numel()} vs {b.numel()}")
    dot = float(a @ b)
    denom = float(a.norm() * b.norm())
    return dot, (dot / denom if denom > 0 else math.nan)


def coherence(grads: Sequence[Tensor] | Tensor) -> float:
    """``Coh(A) = ||sum_i g_i|| / sum_i ||g_i||`` from per-sample flat grads (a list or an ``[N, P]`` tensor).

    1 when all gradients point the same way, 0 when they cancel; nan for an empty set or all-zero gradients.
    """
    if isinstance(grads, Tensor):
        g = grads.detach().double().reshape(grads.shape[0], -1) if grads.numel() else grads.double()
    else:
        if len(grads) == 0:
            return math.nan
        g = torch.stack([x.detach().flatten().double() for x in grads])
    if g.shape[0] == 0:
        return math.nan
    denom = float(g.norm(dim=1).sum())
    return float(g.sum(dim=0).norm()) / denom if denom > 0 else math.nan


def coherence_gain(coh_selected: float, coh_full: float) -> float:
    """Gradient coherence gain ``GCG = (Coh(selected) - Coh(full)) / Coh(full) * 100`` (percent)."""
    if not coh_full or math.isnan(coh_full) or math.isnan(coh_selected):
        return math.nan
    return (coh_selected - coh_full) / coh_full * 100.0


def selected_fraction(keep: Tensor) -> float:
    """``|S_b| / |B_b|`` (nan for an empty batch)."""
    n = keep.numel()
    return float(keep.bool().sum()) / n if n else math.nan


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank."""
    n = x.numel()
    order = torch.sort(x, stable=True).indices
    sorted_x = x[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); pairs with a NaN are dropped.

    Returns nan for fewer than 2 pairs or when either side has zero rank variance.
    """
    xt = torch.as_tensor(x, dtype=torch.float64, device="cpu").flatten()
    yt = torch.as_tensor(y, dtype=torch.float64, device="cpu").flatten()
    if xt.shape != yt.shape:
        raise ValueError(f"length mismatch: {xt.numel()} vs {yt.numel()}")
    ok = ~(torch.isnan(xt) | torch.isnan(yt))
    xt, yt = xt[ok], yt[ok]
    if xt.numel() < 2:
        return math.nan
    rx, ry = _average_ranks(xt), _average_ranks(yt)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float(rx @ ry) / denom if denom > 0 else math.nan


def _summary(v: Tensor, prefix: str) -> dict[str, float]:
    if v.numel() == 0:
        return {f"{prefix}_{k}": math.nan for k in ("mean", "median", "min", "max")}
    return {
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_median": float(torch.quantile(v, 0.5)),
        f"{prefix}_min": float(v.min()),
        f"{prefix}_max": float(v.max()),
    }


def length_summary(lengths: Tensor, keep: Tensor) -> dict[str, float]:
    """Mean/median/min/max length of selected vs dropped samples: keys ``selected_len_*``, ``dropped_len_*``."""
    lv = lengths.detach().double().flatten().cpu()
    k = keep.bool().flatten().cpu()
    return {**_summary(lv[k], "selected_len"), **_summary(lv[~k], "dropped_len")}


def _branch_steps(branch_at: Callable[[int], str], period: int, branch: str, stop: int) -> int:
    """How many of the steps ``0 .. stop-1`` belong to ``branch`` (``branch_at`` has period ``period``)."""
    full, rest = divmod(max(stop, 0), period)
    per = sum(branch_at(r) == branch for r in range(period))
    return full * per + sum(branch_at(r) == branch for r in range(rest))


def diagnostics_due(
    step: int,
    branch_at: Callable[[int], str],
    period: int,
    interval: int,
    interval_domain: int | None = None,
    start: int = 1,
) -> bool:
    """Whether step ``step`` (0-based) is diagnosed: from ``start`` on, every ``interval``-th step *of its branch*
    (``interval_domain`` for domain steps when given), counted per branch, so that an alternating schedule
    visits both branches whatever the interval (a global ``step % k`` with k a multiple of the period G,G,G,D
    only ever lands on general steps). Mixed steps count as one branch: every ``interval``-th step.
    ``branch_at`` is the schedule's pure step -> branch map (``BranchSchedule.at``) with period ``period``."""
    if step < start:
        return False
    branch = branch_at(step)
    k = interval_domain if branch == "domain" and interval_domain else interval
    if k < 1 or period < 1:
        raise ValueError(f"interval and period must be >= 1, got {k} and {period}")
    seen = _branch_steps(branch_at, period, branch, step) - _branch_steps(branch_at, period, branch, start)
    return seen % k == 0


# --- the instruments' noise floors and nulls (issue: GCG vs a size-matched random subset, split-half reliability,
# the attenuation-corrected cross-branch cosine, the counteracted fraction, the per-tensor breakdown) -------------


def gram(grads: Sequence[Tensor] | Tensor) -> Tensor:
    """``K_ij = <g_i, g_j>`` (float64 ``[N, N]``) of per-sample flat gradients (a list or an ``[N, P]`` tensor)."""
    g = grads if isinstance(grads, Tensor) else torch.stack([x.detach().flatten() for x in grads])
    g = g.detach().double().reshape(g.shape[0], -1)
    return g @ g.T


def subset_coherence(k: Tensor, members: Tensor) -> Tensor:
    """``Coh(A)`` for each row of ``members`` (bool ``[S, N]`` or ``[N]``) from the Gram matrix ``k``:
    ``sqrt(1_A^T K 1_A) / sum_{i in A} sqrt(K_ii)``; nan for an empty subset or all-zero gradients."""
    m = members.to(torch.float64)
    single = m.dim() == 1
    m = m.reshape(-1, k.shape[0])
    kk = k.to(torch.float64)
    num = torch.einsum("si,ij,sj->s", m, kk, m).clamp_min(0.0).sqrt()
    den = m @ kk.diagonal().clamp_min(0.0).sqrt()
    out = torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.full_like(den, math.nan))
    return out[0] if single else out


def random_subsets(n: int, size: int, draws: int, generator: torch.Generator) -> Tensor:
    """``draws`` uniformly random subsets of ``size`` of ``n`` items, as a bool ``[draws, n]`` matrix."""
    if not 0 <= size <= n:
        raise ValueError(f"subset size {size} outside 0..{n}")
    keys = torch.rand(draws, n, generator=generator, dtype=torch.float64)
    idx = keys.argsort(dim=1)[:, :size]
    out = torch.zeros(draws, n, dtype=torch.bool)
    out.scatter_(1, idx, True)
    return out


def gcg_with_null(k: Tensor, selected: Tensor, draws: int = 200, seed: int = 0) -> dict[str, float]:
    """GCG of the ``selected`` subset against the GCG of random subsets of the same size (the size-matched null:
    coherence rises as a subset shrinks even when it is random, because fewer vectors cancel less).

    Returns ``coherence_full``, ``coherence_selected``, ``gcg`` (percent), ``gcg_null`` (mean GCG of ``draws``
    random subsets of |selected|), ``gcg_null_sd``, ``gcg_excess = gcg - gcg_null`` and ``gcg_null_p`` (share of
    random subsets at least as coherent as the selected one: small = selection beats chance). With every sample
    selected all of them are 0 (the subsets are the full set); with none, nan."""
    sel = selected.bool().flatten()
    n, size = sel.numel(), int(sel.sum())
    coh_full = float(subset_coherence(k, torch.ones(n, dtype=torch.bool)))
    coh_sel = float(subset_coherence(k, sel)) if size else math.nan
    out = {"coherence_full": coh_full, "coherence_selected": coh_sel, "gcg": coherence_gain(coh_sel, coh_full)}
    if size == 0 or math.isnan(out["gcg"]):
        return {**out, "gcg_null": math.nan, "gcg_null_sd": math.nan, "gcg_excess": math.nan, "gcg_null_p": math.nan}
    null = subset_coherence(k, random_subsets(n, size, draws, torch.Generator().manual_seed(seed)))
    gains = (null - coh_full) / coh_full * 100.0
    out["gcg_null"] = float(gains.mean())
    out["gcg_null_sd"] = float(gains.std()) if draws > 1 else 0.0
    out["gcg_excess"] = out["gcg"] - out["gcg_null"]
    out["gcg_null_p"] = float((null >= coh_sel - 1e-12).double().mean())
    return out


def selection_precision(selected: Tensor, conflict: Tensor) -> dict[str, float]:
    """How well a selection finds the samples known to carry the conflict: ``precision`` (conflict share of the
    selected), ``base_rate`` (conflict share of the batch: a random subset's expected precision), ``recall``
    (share of conflict samples selected) and ``lift = precision / base_rate``; nan where undefined."""
    s, c = selected.bool().flatten(), conflict.bool().flatten()
    if s.shape != c.shape:
        raise ValueError(f"selected and conflict differ in size: {s.numel()} vs {c.numel()}")
    n, ns, nc, both = s.numel(), int(s.sum()), int(c.sum()), int((s & c).sum())
    precision = both / ns if ns else math.nan
    base = nc / n if n else math.nan
    return {
        "precision": precision,
        "base_rate": base,
        "recall": both / nc if nc else math.nan,
        "lift": precision / base if base and not math.isnan(precision) else math.nan,
    }


def spearman_brown(r_half: float) -> float:
    """Reliability of a full batch from the correlation of its two halves: ``2 r / (1 + r)`` (nan for r <= -1)."""
    return 2.0 * r_half / (1.0 + r_half) if r_half > -1.0 else math.nan


def corrected_cosine(cos: float, reliability_g: float, reliability_d: float) -> float:
    """The attenuation-corrected cross-branch cosine ``cos / sqrt(rel_g rel_d)``: the cosine of the two branches'
    expected gradients, once the sampling noise of each batch (which pulls any cosine towards 0) is taken out.
    nan where a reliability is not positive (no signal above noise to correct); not clipped to [-1, 1], so a
    value beyond it shows the correction's own noise."""
    if not (reliability_g > 0 and reliability_d > 0) or math.isnan(cos):
        return math.nan
    return cos / math.sqrt(reliability_g * reliability_d)


def cross_branch_stats(dot: float, sq_g: float, sq_d: float) -> dict[str, float]:
    """From ``<g_g, g_d>``, ``||g_g||^2`` and ``||g_d||^2``: ``grad_dot``, ``grad_cos``, ``norm_ratio =
    ||g_d|| / ||g_g||`` and ``counteracted = -<g_g, g_d> / ||g_g||^2`` (the share of the recovery step that the
    domain gradient undoes along the recovery direction in a mixed update g_g + g_d; negative = it helps)."""
    ng, nd = math.sqrt(max(sq_g, 0.0)), math.sqrt(max(sq_d, 0.0))
    return {
        "grad_dot": dot,
        "grad_cos": dot / (ng * nd) if ng > 0 and nd > 0 else math.nan,
        "norm_ratio": nd / ng if ng > 0 else math.nan,
        "counteracted": -dot / sq_g if sq_g > 0 else math.nan,
    }


# Parameter roles of the per-tensor breakdown, a fixed list so every rank reduces the same vector (layers are
# pooled: per-layer names differ across pipeline stages)
TENSOR_GROUPS: tuple[str, ...] = (
    "embedding",
    "attn_qkv",
    "attn_out",
    "attn_qk_norm",
    "mlp_in",
    "mlp_out",
    "norm",
    "output",
    "other",
)


def tensor_group(name: str) -> str:
    """The role (TENSOR_GROUPS) of a megatron-core GPTModel parameter, by its name."""
    if "layer_norm" in name or "layernorm" in name:
        return "attn_qk_norm" if ("q_layernorm" in name or "k_layernorm" in name) else "norm"
    for key, group in (
        ("word_embeddings", "embedding"),
        ("linear_qkv", "attn_qkv"),
        ("linear_proj", "attn_out"),
        ("linear_fc1", "mlp_in"),
        ("linear_fc2", "mlp_out"),
        ("output_layer", "output"),
    ):
        if key in name:
            return group
    return "other"


def grouped_cross_stats(per_group: dict[str, tuple[float, float, float]]) -> dict[str, float]:
    """Per group ``{group: (dot, sq_g, sq_d)}``: its cosine and its share of the total dot product
    (``<group>/cos``, ``<group>/dot_share``); groups without gradient are left out."""
    total = sum(d for d, _, _ in per_group.values())
    out: dict[str, float] = {}
    for g, (dot, sq_g, sq_d) in per_group.items():
        if sq_g <= 0 and sq_d <= 0:
            continue
        out[f"{g}/cos"] = dot / math.sqrt(sq_g * sq_d) if sq_g > 0 and sq_d > 0 else math.nan
        out[f"{g}/dot_share"] = dot / total if total else math.nan
    return out


def split_halves(n: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """A random split of positions ``0..n-1`` into two halves (sizes differ by at most one)."""
    perm = torch.randperm(n, generator=generator).tolist()
    return sorted(perm[0::2]), sorted(perm[1::2])


def carries_conflict(response_ids: Sequence[int], branch: str, conflict_ids: frozenset[int]) -> bool:
    """Whether a rollout carries the cross-branch conflict, by its tokens: a general one that contains a conflict
    token (the domain's habit where the general teacher objects), a domain one that contains none (the general
    habit where the domain teacher objects)."""
    has = any(t in conflict_ids for t in response_ids)
    return has if branch == "general" else not has


def coherence_report(
    k: Tensor, selected: Tensor, gap_selected: Tensor | None = None, draws: int = 200, seed: int = 0
) -> dict[str, float]:
    """Within-branch coherence instruments from the Gram matrix ``k`` of a branch's per-sample gradients:
    ``coherence_full``, ``n_samples`` and, when the method's own selection drops a sample, its GCG against the
    size-matched null (``gcg``, ``gcg_null``, ``gcg_null_sd``, ``gcg_excess``, ``gcg_null_p``, ``coherence_selected``);
    with ``gap_selected`` (what CaMOPD's gap selection would keep, for every method) the same under ``gap_``."""
    n = k.shape[0]
    full = torch.ones(n, dtype=torch.bool)
    out = {"coherence_full": float(subset_coherence(k, full)) if n else math.nan, "n_samples": float(n)}
    sel = selected.bool().flatten()
    if n and not bool(sel.all()):
        out.update(gcg_with_null(k, sel, draws, seed))
    if gap_selected is not None and n:
        g = gap_selected.bool().flatten()
        if g.any():
            gap = gcg_with_null(k, g, draws, seed + 1)
            out.update({f"gap_{key}": v for key, v in gap.items() if key != "coherence_full"})
    return out
