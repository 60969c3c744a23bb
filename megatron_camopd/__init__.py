"""megatron_camopd: multi-teacher on-policy distillation (CaMOPD, MOPD, Uni-OPD) on megatron-core.

Data flow: spec (config/) -> prompts (data/) -> rollout (rollout/) -> teacher scoring (teachers/, serve/)
-> signals (algo/: gaps, selection, calibration) -> loss inside Megatron (backend/) -> optimizer
-> checkpoint/metrics (backend/, train loop).
"""

__version__ = "0.1.0"
