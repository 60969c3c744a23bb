"""Diagnostics of CaMOPD's claims (arXiv:2605.27115 §3.2, Eqs. (3)-(4)) and of the questions a reviewer asks of
them: does the gap score just track sequence length, and how coherent is vanilla MOPD by comparison?

Gradient geometry (cross-branch dot/cosine, within-branch coherence, coherence gain) on flat gradient vectors,
and selection statistics (selected fraction, gap-vs-length Spearman correlation, lengths of selected vs dropped
samples). Everything returns plain floats (``nan`` where undefined) so it can go straight to the metrics log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
