"""Pure torch algorithms of on-policy distillation (no Megatron, HTTP, Slurm or YAML).

Modules: ``tokens`` (masked per-token helpers), ``weights`` (IS weights), ``losses`` (per-sequence PG / top-k
losses and the selected-sequence reduction), ``camopd`` (schedule, gap scores, mass-target selection),
``uniopd`` (margins, calibration, balancing), ``baselines`` (Relaxed OPD, SelecTKD, ExOPD), ``diagnostics``
(gradient coherence, Spearman, length summaries) and ``methods`` (registry turning rollout signals into
training signals).
"""

from megatron_camopd.algo.camopd import BranchSchedule, SelectionResult, gap_scores, mass_target_select
from megatron_camopd.algo.losses import clip_advantage, pg_seq_loss, reduce_selected, topk_seq_loss
from megatron_camopd.algo.methods import METHODS, Method, build_method
from megatron_camopd.algo.signals import SignalBatch, TrainSignals
from megatron_camopd.algo.tokens import masked_seq_mean, seq_lengths, token_gaps
from megatron_camopd.algo.weights import is_weights

__all__ = [
    "METHODS",
    "BranchSchedule",
    "Method",
    "SelectionResult",
    "SignalBatch",
    "TrainSignals",
    "build_method",
    "clip_advantage",
    "gap_scores",
    "is_weights",
    "masked_seq_mean",
    "mass_target_select",
    "pg_seq_loss",
    "reduce_selected",
    "seq_lengths",
    "token_gaps",
    "topk_seq_loss",
]
