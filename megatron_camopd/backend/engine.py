"""The student's training engine: megatron-core model chunks, DDP, optimizer, LR schedule and one training step.

`Engine.train_step(batch, loss_spec)` runs the spec's loss over micro-batches through megatron-core's schedule
(TP/PP/DP; each micro-batch at its own padded width, see backend/forward.py), finalises gradients
(per-selected-sequence normalisation, see backend/loss.py), clips, and steps the
Megatron optimizer and LR schedule. `Engine.forward(batch, fn)` is a forward-only pass used for generation,
reference log-probs and evaluation. Frozen teachers reuse `build_model_chunks` without DDP or optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_camopd.backend.forward import (
    ParallelGroups,
    comm_device,
    forward_collect,
    run_schedule,
    split_microbatches,
    width_multiple,
)
from megatron_camopd.backend.loss import LossSpec, make_loss_func
from megatron_camopd.backend.model import ModelArch, build_model_chunks, transformer_config


@dataclass
class OptimSettings:
    """Optimizer and LR-schedule settings (mapped from the spec's `train` section)."""

    lr: float = 2e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 120
    lr_decay: str = "constant"  # constant | cosine | linear
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_chunks(arch: ModelArch, tp: int, pp: int, vpp: int | None, dtype: str = "fp32", fp8=None, **overrides):
    """The model chunks this rank holds (one per virtual pipeline stage), with their TransformerConfig."""
    config = transformer_config(arch, tp=tp, pp=pp, vpp=vpp, dtype=_DTYPES[dtype], fp8=fp8, **overrides)
    return build_model_chunks(arch, config), config


def unwrap(chunk):
    """The GPTModel inside a DDP wrapper (or the module itself)."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def ddp_fields(o: OptimSettings) -> dict:
    """megatron-core DistributedDataParallelConfig fields of the student (also printed by `camopd plan`)."""
    return {
        "grad_reduce_in_fp32": True,
        "overlap_grad_reduce": o.overlap_grad_reduce,
        "use_distributed_optimizer": o.distributed_optimizer,
    }


def optimizer_fields(o: OptimSettings, dtype: str, params_dtype: torch.dtype) -> dict:
    """megatron-core OptimizerConfig fields of the student (also printed by `camopd plan`)."""
    return {
        "optimizer": "adam",
        "lr": o.lr,
        "min_lr": o.min_lr,
        "weight_decay": o.weight_decay,
        "adam_beta1": o.adam_beta1,
        "adam_beta2": o.adam_beta2,
        "adam_eps": o.adam_eps,
        "clip_grad": o.clip_grad,
        "use_distributed_optimizer": o.distributed_optimizer,
        "bf16": dtype == "bf16",
        "fp16": dtype == "fp16",
        "params_dtype": params_dtype,
    }


def scheduler_fields(o: OptimSettings) -> dict:
    """megatron-core OptimizerParamScheduler arguments (also printed by `camopd plan`)."""
    return {
        "init_lr": 0.0 if o.warmup_steps else o.lr,
        "max_lr": o.lr,
        "min_lr": o.min_lr,
        "lr_warmup_steps": o.warmup_steps,
        "lr_decay_steps": max(o.total_steps, 1),
        "lr_decay_style": o.lr_decay,
        "start_wd": o.weight_decay,
        "end_wd": o.weight_decay,
        "wd_incr_steps": max(o.total_steps, 1),
        "wd_incr_style": "constant",
    }


class Engine:
    """Student model + Megatron DDP + Megatron optimizer + LR schedule on the current parallel layout."""

    def __init__(
        self,
        arch: ModelArch,
        *,
        tp: int = 1,
        pp: int = 1,
        vpp: int | None = None,
        dtype: str = "fp32",
        fp8=None,
        micro_batch_size: int = 1,
        optim: OptimSettings | None = None,
        init_fn: Callable[[list], None] | None = None,
        model_fields: dict | None = None,
    ) -> None:
        self.arch = arch
        self.tp, self.pp, self.vpp = tp, pp, vpp
        self.micro_batch_size = micro_batch_size
        self.groups = ParallelGroups.from_parallel_state()
        self.optim_settings = optim or OptimSettings()
        # model_fields: TransformerConfig fields from the spec (sequence_parallel, recompute_*; backend/settings.py)
        chunks, config = build_chunks(arch, tp, pp, vpp, dtype, fp8, **(model_fields or {}))
        if init_fn is not None:
            init_fn(chunks)  # e.g. load HF weights before DDP wraps (and copies into) grad buffers
        self.config = config
        config.calculate_per_token_loss = True  # loss_func returns (sum, count): see backend/loss.py
        config.finalize_model_grads_func = finalize_model_grads
        ddp_cfg = DistributedDataParallelConfig(**ddp_fields(self.optim_settings))
        self.chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0))
            for i, c in enumerate(chunks)
        ]
        for c in self.chunks:
            c.broadcast_params()
        config.no_sync_func = [c.no_sync for c in self.chunks]
        if len(self.chunks) == 1:
            config.no_sync_func = config.no_sync_func[0]
        o = self.optim_settings
        opt_cfg = OptimizerConfig(**optimizer_fields(o, dtype, config.params_dtype))
        self.optimizer = get_megatron_optimizer(opt_cfg, self.chunks)
        self.scheduler = OptimizerParamScheduler(self.optimizer, **scheduler_fields(o))

    # ------------------------------------------------------------------ passes
    def models(self) -> list:
        """The bare GPTModel chunks (for state dicts, generation and evaluation)."""
        return [unwrap(c) for c in self.chunks]

    def forward(self, batch: dict[str, torch.Tensor], fn, micro_batch_size: int | None = None) -> dict:
        """Forward-only pass applying `fn(logits_shard, microbatch)` on the last stage (see forward_collect)."""
        return forward_collect(
            self.chunks, batch, fn, self.groups, micro_batch_size=micro_batch_size or self.micro_batch_size
        )

    @contextlib.contextmanager
    def local_grads(self):
        """Backward passes inside stay on this rank: with `overlap_grad_reduce` megatron-core's DDP launches each
        bucket's DP reduction from a backward hook on the last micro-batch, which the gradient diagnostics' own
        passes (per-sample gradients, their own DP sums) must not do. Every bucket is held "not the last
        micro-batch" (again after each `zero_grad_buffer`, whose bucket reset sets it back) and the schedule's
        no-sync switch is a no-op meanwhile; nothing inside calls `finish_grad_sync` (the diagnostics pass their
        own finalize function)."""
        if not self.optim_settings.overlap_grad_reduce:
            yield
            return
        saved = self.config.no_sync_func
        self.config.no_sync_func = contextlib.nullcontext
        self._local = True
        self._hold_buckets(False)
        try:
            yield
        finally:
            self._local = False
            self.config.no_sync_func = saved
            self._hold_buckets(True)

    def _hold_buckets(self, last: bool) -> None:
        for c in self.chunks:
            for g in (*c.bucket_groups, *c.expert_parallel_bucket_groups):
                g.is_last_microbatch = last

    def accumulate_grads(
        self,
        batch: dict[str, torch.Tensor],
        loss_spec: LossSpec,
        finalize=None,
        reduce: bool = True,
        micro_batch_size: int | None = None,
    ) -> dict:
        """Zero the grad buffers, run forward+backward over micro-batches of `micro_batch_size` rows (default: the
        engine's; the diagnostics' per-sample gradients use 1, not a batch padded to 64 rows); returns summed loss
        reports."""
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        if getattr(self, "_local", False):
            self._hold_buckets(False)  # zero_grad_buffer's bucket reset set them to the last micro-batch
        self.optimizer.zero_grad()
        if loss_spec.vocab_size is None:
            loss_spec = dataclasses.replace(loss_spec, vocab_size=self.arch.vocab_size)
        saved = self.config.finalize_model_grads_func
        if finalize is not None:
            self.config.finalize_model_grads_func = finalize
        try:
            reports = run_schedule(
                self.chunks,
                split_microbatches(batch, micro_batch_size or self.micro_batch_size, width_multiple(self.config)),
                make_loss_func(loss_spec, self.groups.tp),
                forward_only=False,
            )
        finally:
            self.config.finalize_model_grads_func = saved
        return self._reduce_reports(reports) if reduce else {}

    def train_step(self, batch: dict[str, torch.Tensor], loss_spec: LossSpec) -> dict[str, float]:
        """One optimizer step on `batch` (this DP rank's rows). Returns loss, grad_norm, lr and loss stats."""
        stats = self.accumulate_grads(batch, loss_spec)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        count = stats.get("count", 0.0)
        out = {
            "loss": stats.get("loss_sum", 0.0) / count if count else 0.0,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "update_ok": bool(ok),
            "train_sequences": count,
        }
        if stats.get("tokens"):
            out["train_rollout_lp_absdiff"] = stats["train_rollout_lp_absdiff_sum"] / stats["tokens"]
        return out

    def _reduce_reports(self, reports: list) -> dict[str, float]:
        """Sum report entries over micro-batches (last stage), over DP, then share them with the pipeline."""
        keys = sorted(reports[0].keys()) if reports else []
        obj = [keys]
        if self.groups.pp_size > 1:
            dist.broadcast_object_list(
                obj, src=dist.get_global_rank(self.groups.pp, self.groups.pp_size - 1), group=self.groups.pp
            )
        keys = obj[0]
        if not keys:
            return {}
        if self.groups.is_last_stage:
            vec = torch.stack([sum(r[k].sum() for r in reports).double() for k in keys]).to(comm_device())
        else:
            vec = torch.zeros(len(keys), dtype=torch.double, device=comm_device())
        dist.all_reduce(vec, group=self.groups.dp)
        if self.groups.pp_size > 1:
            dist.broadcast(vec, src=dist.get_global_rank(self.groups.pp, self.groups.pp_size - 1), group=self.groups.pp)
        return {k: float(v) for k, v in zip(keys, vec.tolist())}
