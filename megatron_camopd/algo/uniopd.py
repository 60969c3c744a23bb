"""Uni-OPD (§3.3 data balancing, §3.4 outcome-guided margin calibration): trajectory returns, outcome-guided margin
calibration and data balancing.

Uni-OPD checks that the teacher's trajectory-level return ``G = (1/T) sum_t r_t`` ranks correct rollouts above
incorrect ones of the same prompt by a margin ``delta*``; if not, it shifts the token rewards (Margin Shift) or
drops the most adversarial trajectories (Greedy Margin Mask). Data balancing keeps rollout groups contrastive
(online) and the prompt set's difficulty spectrum flat (offline).
Conventions: ``reward`` is the outcome reward ``[B]`` (correct = ``reward > 0.5``); ``group`` is a long ``[B]``
prompt id; ``valid`` (optional bool ``[B]``) excludes samples (dropped, NaN, empty) from every statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from megatron_camopd.algo.params import MethodParams
from megatron_camopd.algo.tokens import as_bool_mask, masked_seq_mean, seq_lengths
from megatron_camopd.checks import check, in_range, non_negative, positive
from megatron_camopd.errors import SpecError

MarginMode = Literal["mean", "minmax"]
Scope = Literal["group", "global"]
ShiftDirection = Literal["lift", "suppress", "spread"]


@dataclass
class UniOPDParams(MethodParams):
    """Uni-OPD's margin calibration and data balancing (`method.uniopd`, Uni-OPD §3.3-§3.4)."""

    calibration: Literal["shift", "mask", "none"] = "shift"
    delta_star: float = 0.4
    scope: Literal["group", "global"] = "group"
    margin_mode: Literal["mean", "minmax"] = "mean"
    shift: Literal["spread", "lift", "suppress"] = "spread"
    mask_min_frac: float = 0.25  # greedy margin mask keeps at least max(1, floor(frac * n_side))
    online_balance: bool = True
    balance_ratio: float = 1.0  # target correct:incorrect ratio within a group
    offline_balance: bool = False  # rebalance the streams by pass counts before training (rollout/offline.py)
    offline_n: int = 8  # rollouts per prompt in the offline pass
    offline_shape: Literal["auto", "u", "mirrored_j"] = "auto"
    offline_factor: int = 2  # upsampling factor of the selected prompts
    # upsample prompts whose pass count is in [offline_low, offline_high]; None: the shape's own bounds,
    # [1, N-1] for u (intermediate difficulty) and [0, N-1] for mirrored_j (every prompt not always solved)
    offline_low: int | None = None
    offline_high: int | None = None  # None: offline_n - 1

    def validate(self) -> None:
        super().validate()
        positive(self, "delta_star", "balance_ratio", "offline_n", "offline_factor")
        in_range(self, "mask_min_frac", 0.0, 1.0, low_open=True, high_open=False)
        non_negative(self, "offline_low")
        high = self.offline_n - 1 if self.offline_high is None else self.offline_high
        low = 0 if self.offline_low is None else self.offline_low
        check(low <= high <= self.offline_n, "offline_high", "need offline_low <= offline_high <= offline_n")


def trajectory_returns(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """``G_i = (1/T_i) sum_t r_{i,t}`` over response tokens, ``[B]``."""
    return masked_seq_mean(token_rewards, mask)


def _groups(group: Tensor, scope: str, n: int) -> Tensor:
    if scope == "global":
        return torch.zeros(n, dtype=torch.long, device=group.device if group is not None else None)
    if scope != "group":
        raise SpecError(f"scope: expected 'group' or 'global', got {scope!r}")
    return group


def _margin(g_pos: Tensor, g_neg: Tensor, mode: str) -> float:
    if mode == "mean":
        return float(g_pos.mean() - g_neg.mean())
    if mode == "minmax":
        return float(g_pos.min() - g_neg.max())
    raise SpecError(f"margin_mode: expected 'mean' or 'minmax', got {mode!r}")


@dataclass
class GroupMargins:
    """Per-group margins: ``group_ids [U]``, ``margin [U]`` (NaN where ``S+`` or ``S-`` is empty)."""

    group_ids: Tensor
    margin: Tensor


def group_margins(
    returns: Tensor,
    reward: Tensor,
    group: Tensor,
    mode: MarginMode | str = "mean",
    scope: Scope | str = "group",
    valid: Tensor | None = None,
) -> GroupMargins:
    """Prompt-level margin ``m(x)``: mean mode ``mean_{S+} G - mean_{S-} G``; minmax ``min_{S+} G - max_{S-} G``."""
    grp = _groups(group, scope, returns.shape[0])
    ok = torch.ones_like(returns, dtype=torch.bool) if valid is None else valid.bool()
    correct = reward > 0.5
    ids = torch.unique(grp)
    margins = torch.full((ids.numel(),), float("nan"), dtype=torch.float64, device=returns.device)
    for j, gid in enumerate(ids.tolist()):
        in_g = (grp == gid) & ok
        pos, neg = returns[in_g & correct], returns[in_g & ~correct]
        if pos.numel() and neg.numel():
            margins[j] = _margin(pos.double(), neg.double(), mode)
    return GroupMargins(ids, margins)


@dataclass
class MarginShiftResult:
    """Shifted token rewards ``[B, T]`` plus per-group ``margin_before`` and applied ``shift`` (``Delta``)."""

    token_rewards: Tensor
    group_ids: Tensor
    margin_before: Tensor
    shift: Tensor


def margin_shift(
    token_rewards: Tensor,
    mask: Tensor,
    reward: Tensor,
    group: Tensor,
    target: float = 0.4,
    direction: ShiftDirection | str = "spread",
    mode: MarginMode | str = "mean",
    scope: Scope | str = "group",
    valid: Tensor | None = None,
) -> MarginShiftResult:
    """Margin Shift: where ``m(x) < target``, move ``S+`` up and/or ``S-`` down by ``Delta = target - m(x)``.

    ``lift`` adds ``Delta`` to every response token of ``S+``; ``suppress`` subtracts it from ``S-``; ``spread``
    does ``+Delta/2`` / ``-Delta/2``. A constant added to every token moves ``G`` by that constant, so afterwards
    ``m(x) = target`` and the order inside ``S+`` and ``S-`` is unchanged. Undefined margins leave the group as is.
    """
    if direction not in ("lift", "suppress", "spread"):
        raise SpecError(f"shift: expected lift|suppress|spread, got {direction!r}")
    m = as_bool_mask(mask)
    ok = seq_lengths(m) > 0
    if valid is not None:
        ok &= valid.bool()
    returns = trajectory_returns(token_rewards, m)
    margins = group_margins(returns, reward, group, mode, scope, ok)
    grp = _groups(group, scope, returns.shape[0])
    correct = reward > 0.5
    per_sample = torch.zeros_like(returns, dtype=torch.float64)
    shifts = torch.zeros_like(margins.margin)
    up = {"lift": 1.0, "suppress": 0.0, "spread": 0.5}[direction]
    for j, gid in enumerate(margins.group_ids.tolist()):
        mj = float(margins.margin[j])
        if math.isnan(mj) or mj >= target:  # NaN (undefined) or already wide enough
            continue
        delta = target - mj
        shifts[j] = delta
        in_g = (grp == gid) & ok
        per_sample[in_g & correct] = up * delta
        per_sample[in_g & ~correct] = -(1.0 - up) * delta
    shifted = torch.where(m, token_rewards + per_sample.to(token_rewards.dtype).unsqueeze(-1), token_rewards)
    return MarginShiftResult(shifted, margins.group_ids, margins.margin, shifts)


def greedy_margin_mask(
    returns: Tensor,
    reward: Tensor,
    group: Tensor,
    target: float = 0.4,
    mode: MarginMode | str = "mean",
    min_frac: float = 0.25,
    scope: Scope | str = "group",
    valid: Tensor | None = None,
) -> Tensor:
    """Greedy Margin Mask: bool keep ``[B]``.

    Per group, ``S+`` sorted by ``G`` ascending and ``S-`` descending; repeatedly drop the front of the list whose
    removal gives the larger margin, until ``m >= target`` or no allowed removal raises the margin. A side never
    shrinks below ``max(1, floor(min_frac * n_side))``. Groups with an undefined margin are kept whole.
    """
    if not 0.0 <= min_frac <= 1.0:
        raise SpecError(f"margin_mask_min_frac: expected 0 <= min_frac <= 1, got {min_frac}")
    grp = _groups(group, scope, returns.shape[0])
    ok = torch.ones_like(returns, dtype=torch.bool) if valid is None else valid.bool()
    keep = ok.clone()
    correct = reward > 0.5
    r64 = returns.detach().double()
    for gid in torch.unique(grp).tolist():
        in_g = (grp == gid) & ok
        pos_idx = torch.nonzero(in_g & correct).flatten()
        neg_idx = torch.nonzero(in_g & ~correct).flatten()
        if pos_idx.numel() == 0 or neg_idx.numel() == 0:
            continue
        pos = pos_idx[torch.sort(r64[pos_idx], stable=True).indices].tolist()
        neg = neg_idx[torch.sort(r64[neg_idx], descending=True, stable=True).indices].tolist()
        min_pos, min_neg = max(1, int(min_frac * len(pos))), max(1, int(min_frac * len(neg)))
        cur = _margin(r64[pos], r64[neg], mode)
        while cur < target:
            options: list[tuple[float, str]] = []
            if len(pos) > min_pos:
                options.append((_margin(r64[pos[1:]], r64[neg], mode), "pos"))
            if len(neg) > min_neg:
                options.append((_margin(r64[pos], r64[neg[1:]], mode), "neg"))
            if not options:
                break
            best, side = max(options, key=lambda o: o[0])  # ties: the positive side (listed first)
            if best <= cur:
                break
            dropped = pos.pop(0) if side == "pos" else neg.pop(0)
            keep[dropped] = False
            cur = best
    return keep


def balance_correctness(
    reward: Tensor,
    group: Tensor,
    ratio: float = 1.0,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Online correctness-aware balancing: bool keep ``[B]``.

    Within each group, the majority class is uniformly subsampled (with ``generator``) so that
    ``n_correct : n_incorrect`` is as close to ``ratio`` as possible (each side keeps at least 1).
    All-correct and all-incorrect groups are left as they are.
    """
    if not ratio > 0:
        raise SpecError(f"balance_ratio: expected ratio > 0, got {ratio}")
    ok = torch.ones_like(reward, dtype=torch.bool) if valid is None else valid.bool()
    keep = ok.clone()
    correct = reward > 0.5
    for gid in torch.unique(group).tolist():
        in_g = (group == gid) & ok
        pos = torch.nonzero(in_g & correct).flatten()
        neg = torch.nonzero(in_g & ~correct).flatten()
        n_pos, n_neg = pos.numel(), neg.numel()
        if n_pos == 0 or n_neg == 0:
            continue
        if n_pos > ratio * n_neg:
            drop_from, n_keep = pos, max(1, round(ratio * n_neg))
        else:
            drop_from, n_keep = neg, max(1, round(n_pos / ratio))
        if n_keep >= drop_from.numel():
            continue
        perm = torch.randperm(drop_from.numel(), generator=generator).to(drop_from.device)
        keep[drop_from[perm[n_keep:]]] = False
    return keep


@dataclass
class OfflineBalance:
    """Balanced prompt indices (into the original prompt list) and pass-count histograms (length ``N + 1``)."""

    indices: list[int]
    hist_before: list[int]
    hist_after: list[int]


def offline_difficulty_balance(
    pass_counts: list[int],
    n_rollouts: int = 8,
    shape: Literal["u", "mirrored_j"] | str = "u",
    low: int | None = None,
    high: int | None = None,
    factor: int = 2,
) -> OfflineBalance:
    """Offline difficulty-aware balancing: repeat prompts whose pass count is in ``[low, high]`` ``factor`` times.

    ``shape="u"`` (U-shaped histogram) upsamples intermediate difficulty: default ``[1, N-1]``.
    ``shape="mirrored_j"`` upsamples every prompt that is not always solved: default ``[0, N-1]``.
    The paper's thresholds/factors were not recoverable, hence ``low``/``high``/``factor`` override them.
    """
    if n_rollouts < 1:
        raise SpecError(f"offline_balance.n_rollouts: expected >= 1, got {n_rollouts}")
    if shape not in ("u", "mirrored_j"):
        raise SpecError(f"offline_balance.shape: expected 'u' or 'mirrored_j', got {shape!r}")
    if not isinstance(factor, int) or factor < 1:
        raise SpecError(f"offline_balance.factor: expected an integer >= 1, got {factor!r}")
    lo = (1 if shape == "u" else 0) if low is None else low
    hi = n_rollouts - 1 if high is None else high
    if not 0 <= lo <= hi <= n_rollouts:
        raise SpecError(f"offline_balance.low/high: expected 0 <= low <= high <= {n_rollouts}, got {lo}, {hi}")
    before = [0] * (n_rollouts + 1)
    after = [0] * (n_rollouts + 1)
    indices: list[int] = []
    for i, c in enumerate(pass_counts):
        if not 0 <= c <= n_rollouts:
            raise SpecError(f"pass_counts[{i}]: expected 0..{n_rollouts}, got {c}")
        reps = factor if lo <= c <= hi else 1
        before[c] += 1
        after[c] += reps
        indices.extend([i] * reps)
    return OfflineBalance(indices, before, after)
