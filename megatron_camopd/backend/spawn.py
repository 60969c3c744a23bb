"""Run a function on N local gloo ranks (torch.multiprocessing spawn) and collect each rank's result.

Used by multi-rank tests and small local runs: ``run_on_ranks(fn, 2, *args)`` starts 2 fresh processes
(spawn start method, so callers need a ``__main__`` guard when used from a script), sets the torchrun-style
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), calls
``fn(rank, world_size, *args)`` and returns the list of per-rank return values (anything ``torch.save`` can
write). ``fn`` must be importable by name (module level). A failure on any rank raises in the caller.
The function is responsible for ``init_distributed``; the process group is torn down afterwards if left open.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, threads: int, fn: Callable[..., Any], args: tuple
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(threads)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        from megatron_camopd.backend.cpu_runtime import destroy_distributed

        destroy_distributed()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, threads_per_rank: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return results by rank."""
    with tempfile.TemporaryDirectory(prefix="camopd_spawn_") as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), out_dir, threads_per_rank, fn, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
