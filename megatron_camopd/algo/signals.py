"""Data passed between rollout/teacher scoring and the loss: :class:`SignalBatch` in, :class:`TrainSignals` out.

Kept apart from the method registry so that the backend and rollout code can build/consume them without pulling
in every method. Shapes are validated on construction (``DataError`` naming the field).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from megatron_camopd.errors import DataError


@dataclass
class SignalBatch:
    """Everything known after rollout + teacher scoring; all ``[B, T]`` unless noted."""

    mask: Tensor
    teacher_lp: Tensor  # log pi_T(y_t|h_t) from the teacher this sample was routed to
    rollout_lp: Tensor  # log mu(y_t|h_t) from the rollout engine
    branch: list[str]  # per sample: "general" | "domain" (MOPD/OPD accept any domain name)
    entropy: Tensor | None = None  # student entropy per position (rollout time)
    student_top1: Tensor | None = None  # student's argmax id per position (long)
    teacher_topk_ids: Tensor | None = None  # [B, T, K] long
    teacher_topk_lp: Tensor | None = None  # [B, T, K]
    ref_lp: Tensor | None = None  # initial-student log-probs (ExOPD)
    reward: Tensor | None = None  # [B] outcome reward in {0, 1} (Uni-OPD)
    group: Tensor | None = None  # [B] long prompt group id (Uni-OPD)
    teacher_weight: Tensor | None = None  # [B] alpha_k of the routed teacher (default 1)

    def __post_init__(self) -> None:
        bt = tuple(self.mask.shape)
        if len(bt) != 2:
            raise DataError(f"mask: expected [B, T], got {bt}")
        for name in ("teacher_lp", "rollout_lp", "entropy", "student_top1", "ref_lp"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != bt:
                raise DataError(f"{name}: expected shape {bt}, got {tuple(t.shape)}")
        for name in ("teacher_topk_ids", "teacher_topk_lp"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 3 or tuple(t.shape[:2]) != bt):
                raise DataError(f"{name}: expected shape {bt + ('K',)}, got {tuple(t.shape)}")
        for name in ("reward", "group", "teacher_weight"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != bt[:1]:
                raise DataError(f"{name}: expected shape {bt[:1]}, got {tuple(t.shape)}")
        if len(self.branch) != bt[0]:
            raise DataError(f"branch: expected {bt[0]} entries, got {len(self.branch)}")


@dataclass
class TrainSignals:
    """What the Megatron loss needs. ``advantages`` are detached, already scaled (r_b, alpha), 0 where masked."""

    advantages: Tensor  # [B, T]
    token_weight: Tensor  # [B, T] 1 normally; SelecTKD / entropy mask; 0 on padding
    sample_weight: Tensor  # [B] 1 = selected, 0 = dropped
    metrics: dict[str, float]
    seq_scale: Tensor | None = None  # [B] r_b * alpha for the top-k form (the pg form has it in advantages)
