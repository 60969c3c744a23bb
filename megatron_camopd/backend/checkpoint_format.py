"""How a checkpoint's optimizer state is laid out and who writes it: `checkpoint.optimizer_format` and
`checkpoint.fully_parallel` (issue 29, defect 9: slow at scale).

Optimizer formats (megatron-core's `distrib_optim_sharding_type`; they differ only for the distributed optimizer,
megatron/core/optimizer/distrib_optimizer.py `sharded_state_dict`):
- `fully_reshardable`: at each save every DP rank all-gathers the whole replica's optimizer state (fp32 main
  weights, m and v: 12 bytes a parameter of its TP x PP shard, on the host) and turns it into model-space tensors;
  a checkpoint reshards over TP, PP and DP.
- `dp_reshardable`: every rank writes its own DP shard of the flat buffers, no communication and no gathered
  copy; a checkpoint reshards over DP only, so a resume with another TP, PP or VPP is refused here (naming the
  field) before any model loads.
The format a checkpoint was written with is recorded in its train_state (`optimizer`, with the TP/PP/DP layout
and whether the optimizer was distributed) and a load always asks for that format, so a spec may change
`checkpoint.optimizer_format` on resume: the next save writes the new one. Checkpoints that record none were
written as `fully_reshardable`.

`checkpoint.fully_parallel`: megatron-core's FullyParallelSave/LoadStrategyWrapper over the data-parallel group.
A tensor every DP rank holds (the model's weights, a fully_reshardable optimizer state) is written by one of them
chosen to spread the bytes evenly, instead of all by DP rank 0; on load each such tensor is read once and
broadcast over the group.
"""

from __future__ import annotations

from typing import Any

from megatron_camopd.errors import CheckpointError

OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
LEGACY_FORMAT = "fully_reshardable"  # what checkpoints that record no format were written with
STATE_KEY = "optimizer"  # train_state.json: {"format", "distributed", "tp", "pp", "vpp", "dp"}
FIELD = "checkpoint.optimizer_format"


def metadata(fmt: str) -> dict:
    """The `metadata` argument of megatron-core's optimizer.sharded_state_dict for format `fmt`."""
    if fmt not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"{FIELD}: unknown optimizer format {fmt!r} (one of {', '.join(OPTIMIZER_FORMATS)})")
    return {"distrib_optim_sharding_type": fmt}


def is_distributed(optimizer: Any) -> bool:
    """Whether `optimizer` (possibly a ChainedOptimizer) holds a megatron-core DistributedOptimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(s, DistributedOptimizer) for s in getattr(optimizer, "chained_optimizers", [optimizer]))


def layout() -> dict:
    """This process's model-parallel layout (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(with_context_parallel=True),
    }


def record(fmt: str, optimizer: Any) -> dict:
    """What train_state records of the optimizer state a save writes."""
    return {"format": fmt, "distributed": is_distributed(optimizer), **layout()}


def saved_format(state: dict) -> str:
    """The optimizer format a checkpoint's train_state records (checkpoints before the record: fully_reshardable)."""
    rec = state.get(STATE_KEY)
    fmt = rec.get("format", LEGACY_FORMAT) if isinstance(rec, dict) else LEGACY_FORMAT
    if fmt not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"train_state records an unknown optimizer format {fmt!r}")
    return fmt


def check_layout(where: Any, state: dict, tp: int, pp: int, vpp: int | None) -> None:
    """Refuse, naming the field, a resume that a dp_reshardable distributed-optimizer checkpoint cannot serve: one
    with another TP, PP or VPP (that format reshards over DP only)."""
    rec = state.get(STATE_KEY)
    if not isinstance(rec, dict) or saved_format(state) != "dp_reshardable" or not rec.get("distributed"):
        return
    saved = {"tp": rec.get("tp"), "pp": rec.get("pp"), "vpp": rec.get("vpp")}
    now = {"tp": tp, "pp": pp, "vpp": vpp}
    changed = [f"parallel.{k}: {saved[k]} -> {now[k]}" for k in now if saved[k] != now[k]]
    if changed:
        raise CheckpointError(
            f"{where}: its optimizer state was saved with {FIELD}=dp_reshardable, which reshards over data "
            f"parallelism only, and this run changes {'; '.join(changed)}. Resume at the saved layout (and save "
            f"with {FIELD}=fully_reshardable to change it), or start without the optimizer state"
        )


def hint(state: dict) -> str:
    """Appended to an optimizer-load failure of a dp_reshardable checkpoint: the layout it was saved at."""
    rec = state.get(STATE_KEY)
    if not isinstance(rec, dict) or saved_format(state) != "dp_reshardable":
        return ""
    at = ", ".join(f"{k}={rec.get(k)}" for k in ("tp", "pp", "vpp", "dp"))
    return f" (saved with {FIELD}=dp_reshardable at {at}; that format keeps the DP-sharded bucket layout)"


def _dp_group() -> Any:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def save_strategy(fully_parallel: bool) -> Any:
    """dist_checkpointing.save's `sharded_strategy`: None (megatron-core's default) or the fully parallel one."""
    if not fully_parallel:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())


def load_strategy(fully_parallel: bool, path: str) -> Any:
    """dist_checkpointing.load's `sharded_strategy` for the checkpoint at `path`."""
    if not fully_parallel:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), _dp_group())
