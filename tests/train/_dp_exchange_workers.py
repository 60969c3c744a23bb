"""Spawned-rank worker for the DP-exchange test: the same trainings with the scalar exchange and with the full
exchange (every sample with its top-k tensors, as before rollout/dp_exchange.py)."""

from __future__ import annotations

from ._workers import run_train


def full_exchange(local, dp_rank, dp_size, group, accept_k):
    """The exchange before rollout/dp_exchange.py: whole samples, top-k tensors included."""
    import torch.distributed as dist

    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, local, group=group)
    return [s for part in gathered for s in part]


def scalar_vs_full(rank: int, world: int, runs: dict[str, tuple[list[str], list[str]]]) -> dict:
    from megatron_camopd.rollout import collect

    out = {}
    scalar = collect.exchange_samples
    for name, (ov_scalar, ov_full) in runs.items():
        collect.exchange_samples = scalar
        a = run_train(rank, world, ov_scalar)
        collect.exchange_samples = full_exchange
        b = run_train(rank, world, ov_full)
        out[name] = (a, b)
    collect.exchange_samples = scalar
    return out
