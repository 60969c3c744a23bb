"""Forward passes through megatron-core's own schedules: training steps and forward-only collection.

Both go through `get_forward_backward_func`, so TP, PP (1F1B and interleaved) and DP behave exactly as in
Megatron training. `forward_step` returns `(output, partial(loss_func, ...))` as megatron-core expects.

`forward_collect` runs a forward-only pass and applies a function to each micro-batch's vocab-sharded logits on
the last pipeline stage (log-probs, top-k, next-token sampling...). Its results are broadcast from the last stage
to every rank of the pipeline group, so all ranks continue with the same tensors (generation, teacher scoring).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class ParallelGroups:
    """The process groups a pass needs, passed explicitly."""

    tp: object
    pp: object
    dp: object

    @classmethod
    def from_parallel_state(cls) -> "ParallelGroups":
        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            pp=ps.get_pipeline_model_parallel_group(),
            dp=ps.get_data_parallel_group(),
        )

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def comm_device() -> torch.device:
    """Where tensors handed to collectives live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move a micro-batch (built on the CPU) to the model's device; a no-op on CPU."""
    if not torch.cuda.is_available():
        return mb
    return {k: v.cuda(non_blocking=True) for k, v in mb.items()}


def split_microbatches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Cut a dict of [B, ...] tensors into consecutive micro-batches of `micro_batch_size` rows."""
    n = next(iter(batch.values())).shape[0]
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} rows is not divisible by micro_batch_size={micro_batch_size}")
    return [{k: v[i : i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def _model_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Run one model chunk on right-padded tokens; causal attention needs no explicit mask for right padding."""
    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.long, device=tokens.device).unsqueeze(0).expand(b, s)
    return model(tokens, position_ids, None)


def _forward_step(loss_func: Callable, data_iterator, model):
    mb = to_device(next(data_iterator))
    output = _model_forward(model, mb["tokens"])
    return output, partial(loss_func, mb)


def run_schedule(
    model_chunks: list,
    microbatches: list[dict[str, torch.Tensor]],
    loss_func: Callable,
    *,
    seq_length: int,
    forward_only: bool,
    vpp: int | None = None,
) -> list:
    """Drive megatron-core's schedule over `microbatches`; returns the per-micro-batch reports (last stage)."""
    fb = get_forward_backward_func()
    n_chunks = len(model_chunks)
    iters = [iter(microbatches) for _ in range(n_chunks)] if n_chunks > 1 else iter(microbatches)
    mbs = microbatches[0]["tokens"].shape[0]
    return fb(
        forward_step_func=partial(_forward_step, loss_func),
        data_iterator=iters,
        model=model_chunks if n_chunks > 1 else model_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def _collect_loss(fn: Callable, mb: dict, output_tensor: torch.Tensor):
    with torch.no_grad():
        out = fn(output_tensor, mb)
    return output_tensor.new_zeros(()), torch.tensor(0, dtype=torch.int), out


def forward_collect(
    model_chunks: list,
    batch: dict[str, torch.Tensor],
    fn: Callable[[torch.Tensor, dict], dict[str, torch.Tensor]],
    groups: ParallelGroups,
    *,
    micro_batch_size: int,
) -> dict[str, torch.Tensor]:
    """Forward-only pass; `fn(logits_shard [b, s, V/tp], microbatch) -> dict of [b, ...] tensors` on the last stage.

    Returns the concatenated dict on every rank of the pipeline group (broadcast from the last stage).
    """
    for m in model_chunks:
        m.eval()
    n = batch["tokens"].shape[0]
    mbs = max(1, min(micro_batch_size, n))
    # Pad with copies of the last row to whole micro-batches (interleaved PP: a multiple of pp of them);
    # the padded rows' results are dropped below.
    unit = mbs * (groups.pp_size if len(model_chunks) > 1 else 1)
    extra = -n % unit
    if extra:
        batch = {k: torch.cat([v, v[-1:].expand(extra, *v.shape[1:])]) for k, v in batch.items()}
    mbs_list = split_microbatches(batch, mbs)
    with torch.no_grad():
        reports = run_schedule(
            model_chunks, mbs_list, partial(_collect_loss, fn), seq_length=batch["tokens"].shape[1],
            forward_only=True,
        )
    result: dict[str, torch.Tensor] = {}
    if groups.is_last_stage:
        result = {k: torch.cat([r[k] for r in reports], dim=0)[:n].cpu() for k in reports[0]}
    if groups.pp_size > 1:
        obj = [result if groups.is_last_stage else None]
        src = dist.get_global_rank(groups.pp, groups.pp_size - 1)
        dist.broadcast_object_list(obj, src=src, group=groups.pp)
        result = obj[0]
    return result
