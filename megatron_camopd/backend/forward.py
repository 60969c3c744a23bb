"""Forward passes through megatron-core's own schedules: training steps and forward-only collection.

Both go through `get_forward_backward_func`, so TP, PP (1F1B and interleaved) and DP behave exactly as in
Megatron training. `forward_step` returns `(output, partial(loss_func, ...))` as megatron-core expects.

`forward_collect` runs a forward-only pass and applies a function to each micro-batch's vocab-sharded logits on
the last pipeline stage (log-probs, top-k, next-token sampling...). Its results are broadcast from the last stage
to every rank of the pipeline group, so all ranks continue with the same tensors (generation, teacher scoring).

Widths: every micro-batch is cut to its own longest sequence (the batch's optional `seq_len` [B] entry; without
it, the batch width) and right-padded to `width_multiple(config)`: TP under sequence parallelism (the sequence
is split over the TP ranks), 16 under FP8 (TransformerEngine's FP8 GEMMs need the token dimension divisible by 8,
16 for every recipe, TransformerEngine's FP8 GEMM alignment), 16 * TP with both (each rank's slice stays a multiple of
16). Every
`[B, W, ...]` tensor of a batch is position-aligned and cut or zero-padded with it; padding sits after every
sequence, which causal attention never lets a real position see, and carries no loss (mask 0). When micro-batch
widths differ under (1F1B) pipeline parallelism, megatron-core's `variable_seq_lengths` sends each activation's
shape ahead of it; interleaved pipelining (VPP) deadlocks with that over gloo, so there one call's micro-batches
share the widest micro-batch's width. forward_collect pads each result back to the widest micro-batch's width (zeros
past a row's width).
(Packed THD micro-batches need TransformerEngine's attention; `backend/packing.py` decides.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class ParallelGroups:
    """The process groups a pass needs, passed explicitly."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup

    @classmethod
    def from_parallel_state(cls) -> ParallelGroups:
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


SEQ_LEN = "seq_len"  # optional [B] entry of a batch: each row's real length (tokens before the padding)


def width_multiple(config) -> int:
    """What every forward's sequence width must be a multiple of (see the module docstring)."""
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return tp * (16 if getattr(config, "fp8", None) else 1)


def split_microbatches(
    batch: dict[str, torch.Tensor], micro_batch_size: int, multiple: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Cut a dict of [B, ...] tensors into consecutive micro-batches of `micro_batch_size` rows, each cut to its own
    longest sequence (`seq_len`) and padded to a multiple of `multiple` (see the module docstring)."""
    n, width = batch["tokens"].shape[:2]
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} rows is not divisible by micro_batch_size={micro_batch_size}")
    out = []
    for i in range(0, n, micro_batch_size):
        mb = {k: v[i : i + micro_batch_size] for k, v in batch.items()}
        longest = int(mb[SEQ_LEN].max()) if SEQ_LEN in mb else width
        out.append(fit_width(mb, width, -(-max(longest, 1) // multiple) * multiple))
    return out


def fit_width(mb: dict[str, torch.Tensor], width: int, target: int) -> dict[str, torch.Tensor]:
    """Cut or zero-pad every position-aligned `[b, width, ...]` tensor of `mb` to `target` columns."""
    if target == width:
        return mb
    out = {}
    for k, v in mb.items():
        if v.dim() >= 2 and v.shape[1] == width and k != SEQ_LEN:
            if target < width:
                v = v[:, :target]
            else:
                v = torch.cat([v, v.new_zeros((v.shape[0], target - width, *v.shape[2:]))], dim=1)
        out[k] = v
    return out


def _pad_dim1(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-micro-batch results along rows, zero-padding dim 1 to the widest."""
    if any(p.dim() < 2 for p in parts) or len({p.shape[1] for p in parts}) == 1:
        return torch.cat(parts, dim=0)
    w = max(p.shape[1] for p in parts)
    return torch.cat(
        [
            torch.cat([p, p.new_zeros((p.shape[0], w - p.shape[1], *p.shape[2:]))], dim=1) if p.shape[1] < w else p
            for p in parts
        ],
        dim=0,
    )


def _model_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Run one model chunk on right-padded tokens; causal attention needs no explicit mask for right padding."""
    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.long, device=tokens.device).unsqueeze(0).expand(b, s)
    return model(tokens, position_ids, None)


def _forward_step(loss_func: Callable, data_iterator, model):
    mb = to_device(next(data_iterator))
    output = _model_forward(model, mb["tokens"])
    return output, partial(loss_func, mb)


def model_config(model_chunks: list):
    """The TransformerConfig the chunks share (through a DDP wrapper or not)."""
    from megatron.core.utils import get_model_config

    return get_model_config(model_chunks[0])


def run_schedule(
    model_chunks: list,
    microbatches: list[dict[str, torch.Tensor]],
    loss_func: Callable,
    *,
    forward_only: bool,
    seq_length: int | None = None,
) -> list:
    """Drive megatron-core's schedule over `microbatches`; returns the per-micro-batch reports (last stage).

    The sequence length is the micro-batches' own width; when it differs between micro-batches, megatron-core's
    `variable_seq_lengths` is on for this call (pipeline stages exchange each activation's shape first).
    `seq_length` is accepted for callers of the older signature and must match the micro-batches."""
    fb = get_forward_backward_func()
    n_chunks = len(model_chunks)
    iters = [iter(microbatches) for _ in range(n_chunks)] if n_chunks > 1 else iter(microbatches)
    mbs = microbatches[0]["tokens"].shape[0]
    widths = {mb["tokens"].shape[1] for mb in microbatches}
    if n_chunks > 1 and len(widths) > 1:  # interleaved: one width (its schedule deadlocks on variable shapes)
        microbatches = [fit_width(mb, mb["tokens"].shape[1], max(widths)) for mb in microbatches]
        iters = [iter(microbatches) for _ in range(n_chunks)]
        widths = {max(widths)}
    if seq_length is not None and widths != {seq_length}:
        raise ValueError(f"seq_length={seq_length} does not match the micro-batch widths {sorted(widths)}")
    config = model_config(model_chunks)
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = saved or len(widths) > 1
    try:
        return fb(
            forward_step_func=partial(_forward_step, loss_func),
            data_iterator=iters,
            model=model_chunks if n_chunks > 1 else model_chunks[0],
            num_microbatches=len(microbatches),
            seq_length=max(widths),
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
    finally:
        config.variable_seq_lengths = saved


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

    Returns the concatenated dict on every rank of the pipeline group (broadcast from the last stage). `s` is the
    micro-batch's own padded width (module docstring); results of different widths are zero-padded along dim 1.
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
    mbs_list = split_microbatches(batch, mbs, width_multiple(model_config(model_chunks)))
    with torch.no_grad():
        reports = run_schedule(model_chunks, mbs_list, partial(_collect_loss, fn), forward_only=True)
    result: dict[str, torch.Tensor] = {}
    if groups.is_last_stage:
        result = {k: _pad_dim1([r[k] for r in reports])[:n].cpu() for k in reports[0]}
    if groups.pp_size > 1:
        obj = [result if groups.is_last_stage else None]
        src = dist.get_global_rank(groups.pp, groups.pp_size - 1)
        dist.broadcast_object_list(obj, src=src, group=groups.pp)
        shared = obj[0]
        assert shared is not None, "the last stage sends its result"
        result = shared
    return result
