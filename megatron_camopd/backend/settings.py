"""What the spec's `model`, `parallel` and `train` sections become in megatron-core, in one place.

- `model_fields(parallel)`: the TransformerConfig fields (megatron-core's names) the spec sets beyond the
  architecture and layout: `sequence_parallel`, and `recompute_granularity` with, for `full`,
  `recompute_method="uniform", recompute_num_layers=1` (every layer recomputed from its input) or,
  for `selective`, `recompute_modules`. The FP8 fields come from `backend.model.fp8_transformer_fields`.
- `optim_settings(spec)`: the Engine's `OptimSettings`, from which it builds megatron-core's `OptimizerConfig`,
  `DistributedDataParallelConfig` and `OptimizerParamScheduler`.
- `ddp_config_fields(spec)`, `optimizer_config_fields(spec)`, `scheduler_fields(spec)`: the
  DistributedDataParallelConfig / OptimizerConfig / OptimizerParamScheduler arguments (megatron-core's names)
  the Engine builds from those settings (backend/engine.py), for `camopd plan`.
- `cluster_transformer_config(spec, arch)`: the TransformerConfig a GPU run of the spec builds, built on any
  machine (no CUDA, TransformerEngine or weights; only the HF config.json): what `camopd plan` prints.

The session hands `model_fields` and `optim_settings` to the Engine; `camopd plan` and the field-walk test call
the same functions, so what they show is what a run uses.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_camopd.backend.engine import OptimSettings, ddp_fields, optimizer_fields
from megatron_camopd.backend.engine import scheduler_fields as engine_scheduler_fields
from megatron_camopd.backend.model import (
    ModelArch,
    fp8_transformer_fields,
    transformer_config,
    transformer_engine_available,
)
from megatron_camopd.errors import SpecError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def recompute_fields(parallel: Any) -> dict[str, Any]:
    """`parallel.recompute` (+ `recompute_modules`) as TransformerConfig fields."""
    if parallel.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if parallel.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(parallel.selective_modules)}
    return {"recompute_granularity": None}


def model_fields(parallel: Any, *, check_device: bool = True) -> dict[str, Any]:
    """The student's TransformerConfig fields from `parallel` (FP8 aside). Sequence parallelism runs on either
    layer spec (the local one with `backend.model.SequenceParallelRMSNorm`). With `check_device`, selective
    recompute of `layernorm` without TransformerEngine is a clear SpecError: megatron-core (0.16.1) reaches TE's
    FP8 state manager from its `CheckpointWithoutOutput` whatever the FP8 setting."""
    if (
        check_device
        and "layernorm" in (recompute_fields(parallel).get("recompute_modules") or ())
        and not transformer_engine_available()
    ):
        raise SpecError(
            "parallel.recompute_modules: 'layernorm' needs TransformerEngine (a CUDA GPU and "
            "transformer_engine); use mlp / core_attn on this machine"
        )
    return {
        "sequence_parallel": parallel.sequence_parallel,
        "gradient_accumulation_fusion": grad_accum_fusion(parallel.gradient_accumulation_fusion, check_device),
        **recompute_fields(parallel),
    }


def grad_accum_fusion_available() -> bool:
    """Whether megatron-core's fused weight-gradient accumulation runs here: TransformerEngine's linears do it
    themselves, the output layer (megatron-core's own ColumnParallelLinear) needs Apex's CUDA extension."""
    import importlib.util

    return transformer_engine_available() and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def grad_accum_fusion(setting: bool | None, check_device: bool = True) -> bool:
    """`parallel.gradient_accumulation_fusion` resolved: None is on where the kernels are (`camopd plan`, which
    shows a GPU image's run, takes them as present), true is a SpecError where they are not."""
    if not check_device:
        return setting is not False
    if setting and not grad_accum_fusion_available():
        raise SpecError(
            "parallel.gradient_accumulation_fusion: needs TransformerEngine and Apex's fused_weight_gradient_mlp_cuda "
            "(a CUDA GPU image); set it to null (on where available) or false"
        )
    return grad_accum_fusion_available() if setting is None else setting


def optim_settings(spec: Any) -> OptimSettings:
    """The Engine's optimizer and LR-schedule settings from `train`."""
    t = spec.train
    return OptimSettings(
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_steps=t.warmup_steps,
        total_steps=t.steps,
        lr_decay=t.lr_decay,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        distributed_optimizer=t.distributed_optimizer,
        overlap_grad_reduce=t.overlap_grad_reduce,
    )


def ddp_config_fields(spec: Any) -> dict[str, Any]:
    """megatron-core DistributedDataParallelConfig fields of the student (the Engine's own, backend/engine.py)."""
    return ddp_fields(optim_settings(spec))


def optimizer_config_fields(spec: Any) -> dict[str, Any]:
    """megatron-core OptimizerConfig fields of the student (the Engine's own, backend/engine.py)."""
    dtype = spec.model.dtype
    return {**optimizer_fields(optim_settings(spec), dtype, DTYPES[dtype]), "params_dtype": str(DTYPES[dtype])}


def scheduler_fields(spec: Any) -> dict[str, Any]:
    """megatron-core OptimizerParamScheduler arguments (the Engine's own, backend/engine.py)."""
    return engine_scheduler_fields(optim_settings(spec))


def teacher_dtype(spec: Any, name: str) -> str:
    """An in-process (or served) teacher's dtype: `teachers.<name>.dtype`, else the student's `model.dtype`."""
    return spec.teachers[name].dtype or spec.model.dtype


def cluster_transformer_config(spec: Any, arch: ModelArch) -> Any:
    """The student's TransformerConfig as a CUDA + TransformerEngine run of `spec` builds it (Engine included:
    `calculate_per_token_loss`), on any machine. Without TransformerEngine here, the fields whose check in
    TransformerConfig.__post_init__ imports it (`apply_rope_fusion`; FP8 with layernorm recompute) are validated
    off and set afterwards, so the config shows what the cluster builds."""
    p = spec.parallel
    fp8 = p.fp8 if p.fp8.enabled else None
    fields = {"calculate_per_token_loss": True, **model_fields(p, check_device=False)}
    deferred: dict[str, Any] = {}
    if not transformer_engine_available():
        deferred["apply_rope_fusion"] = True
        if fp8 is not None and "layernorm" in p.selective_modules:
            deferred.update(fp8_transformer_fields(fp8, check_device=False))
            fp8 = None
    config = transformer_config(
        arch,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        dtype=DTYPES[spec.model.dtype],
        fp8=fp8,
        cluster=True,
        **fields,
        **{k: False for k in deferred if k == "apply_rope_fusion"},
    )
    for key, value in deferred.items():
        setattr(config, key, value)
    return config
