"""Test-only stand-in for the two CPU kernels SGLang 0.5.23 imports from `sgl_kernel` under
`SGLANG_USE_CPU_ENGINE=1` (the real `sgl-kernel` / `sglang-kernel` wheels on the registry are CUDA-only and fail
to import on a CPU machine). Put this folder on the SGLang server's PYTHONPATH; nothing of the project imports it.

- `assign_req_to_token_pool_cpu` (used by `sglang/srt/mem_cache/allocation.py`): writes each request's slice of
  `out_cache_loc` into `req_to_token[row, start:end]` -- a pure-torch copy of the C++ kernel's loop.
- Every other name SGLang's CPU path imports when its modules load (`copy_all_layer_kv_cache_cpu` of
  `kernels/ops/kvcache/cache_move.py`, the speculative-decoding kernels of `kernels/ops/speculative/`: tree
  building and verification, accepted-token cache locations, ...) is a function that refuses loudly when called:
  none of them runs in the flows the suite uses (no speculative decoding, no KV page moves).
"""

from __future__ import annotations

import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    rows = req_pool_indices.tolist()
    starts, ends = start_offset.tolist(), end_offset.tolist()
    pos = 0
    for row, start, end in zip(rows, starts, ends):
        n = int(end) - int(start)
        if n <= 0:
            continue
        if int(end) > pool_len:
            raise IndexError(f"assign_req_to_token_pool_cpu: end {end} past the pool's {pool_len} slots")
        req_to_token[int(row), int(start) : int(end)] = out_cache_loc[pos : pos + n].to(req_to_token.dtype)
        pos += n


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def refuse(*args, **kwargs):
        raise NotImplementedError(f"tests/sglang_cpu/sgl_kernel: {name} is not provided by the test stand-in")

    refuse.__name__ = name
    return refuse
