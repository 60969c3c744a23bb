"""Estimated rollout time per training step, for `camopd plan`: the in-process `megatron` engine against SGLang
rollout servers, so the choice is visible before a GPU hour is spent. A rough, memory-bandwidth estimate.

Decoding is memory-bound: a decode step reads every weight once and the KV cache of every live sequence once.
With B = HBM_BYTES_S * HBM_EFFICIENCY bytes/s per GPU, a step over b sequences costs

    t_step = (W + b * c * K) / B + overhead

(W: weight bytes one GPU reads; K: KV bytes one token costs on that GPU; c = P + N / 2, the mean cached length
of a response growing from the prompt P = data.max_prompt_tokens to P + N, N = rollout.max_new_tokens). Every
response is taken to run to N tokens (an upper bound; stops shorten both engines alike). Prefill (compute-bound,
P tokens per sample) and teacher scoring are left out. S = rollout.prompts_per_step * rollout.n_samples.

- `megatron` (rollout/kv_engine.py, on the trainer's GPUs): each of the dp data-parallel ranks decodes its
  ceil(S / dp) samples in sequential groups of g rows (the most `rollout.kv_cache_gb` holds, 16 x (P + N) x K
  per 16 rows under FP8, at least one padded group); a group takes N steps; each step runs through the pp stages
  one after another, each stage reading its own W_stage and K_stage (this rank's share at TP), with eager kernel
  launches and TP all-reduces (EAGER_S_PER_LAYER per layer) and one host sync per step (HOST_SYNC_S: the tokens
  go to the CPU):

      T_megatron = ceil(ceil(S / dp) / g) * N * (pp * ((W_stage + g * c * K_stage) / B + L / pp * EAGER_S_PER_LAYER)
                   + HOST_SYNC_S)

  With in-process overlap (`rollout.max_staleness` > 0) it is the same formula at TP = PP = 1 (the snapshot model);
  then it overlaps training.
- `sglang` (servers on nodes of their own): R = rollout.sglang.nodes * servers per node * dp engines of tp GPUs;
  each holds b = min(ceil(S / R), KV_tokens / (P + N)) sequences at once, KV_tokens = (mem_fraction_static *
  launcher.gpu_memory_gb * tp - W_model) / K_model; CUDA graphs and an overlapped scheduler leave SGLANG_STEP_S of
  overhead a step, plus ALLREDUCE_S for each of a layer's two TP all-reduces when tp > 1:

      T_sglang = ceil(S / (R * b)) * N * ((W_model / tp + b * c * K_model / tp) / B + SGLANG_STEP_S
                 + [tp > 1] * 2 * L * ALLREDUCE_S)

The constants are assumptions stated here (H100 SXM), not measurements of this code.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_camopd.backend.model import ModelArch
from megatron_camopd.launch.memory import DTYPE_BYTES, GB, stage_params

HBM_BYTES_S = 3.35e12  # H100 SXM HBM3 peak
HBM_EFFICIENCY = 0.7  # the fraction a decode step's reads reach
EAGER_S_PER_LAYER = 60e-6  # eager decode: ~12 kernel launches and, at TP > 1, 2 all-reduces per layer
HOST_SYNC_S = 100e-6  # the megatron engine copies each step's tokens to the host
SGLANG_STEP_S = 1e-3  # SGLang's scheduler and sampling per decode step (CUDA graphs for the model)
ALLREDUCE_S = 10e-6  # one small NVLink all-reduce inside a CUDA graph
FP8_ROWS = 16  # rollout/kv_engine.py pads every forward to 16 rows under FP8


def kv_bytes_per_token(arch: ModelArch, layers: float, tp: int, dtype_bytes: int) -> float:
    """KV cache bytes one token costs for `layers` layers at TP `tp` (K and V, this rank's KV heads)."""
    return 2 * layers * (arch.num_kv_heads / tp) * arch.head_dim * dtype_bytes


def _bandwidth() -> float:
    return HBM_BYTES_S * HBM_EFFICIENCY


def megatron_estimate(spec: Any, arch: ModelArch, n_samples: int, dp: int) -> dict[str, Any]:
    """The in-process engine's step estimate (module docstring) and its KV-group facts."""
    p, r = spec.parallel, spec.rollout
    overlapped = r.max_staleness > 0
    tp, pp = (1, 1) if overlapped else (p.tp, p.pp)
    wb = DTYPE_BYTES[spec.model.dtype]
    prompt, new = spec.data.max_prompt_tokens, r.max_new_tokens
    seq = min(spec.seq_length, prompt + new)
    k_stage = kv_bytes_per_token(arch, arch.num_layers / pp, tp, wb)
    w_stage = max(stage_params(arch, tp, pp, s) for s in {0, pp - 1}) * wb
    mult = FP8_ROWS if p.fp8.enabled and not overlapped else 1
    budget = r.kv_cache_gb * 2**30
    min_group = mult * seq * k_stage
    rows = max(mult, int(budget // (seq * k_stage)) // mult * mult)
    per_rank = math.ceil(n_samples / dp)
    rows = min(rows, -(-per_rank // mult) * mult)
    groups = math.ceil(per_rank / rows)
    mean_ctx = prompt + new / 2
    step = pp * ((w_stage + rows * mean_ctx * k_stage) / _bandwidth() + arch.num_layers / pp * EAGER_S_PER_LAYER)
    seconds = groups * new * (step + HOST_SYNC_S)
    return {
        "seconds": round(seconds, 1),
        "groups_per_rank": groups,
        "rows_per_group": rows,
        "samples_per_rank": per_rank,
        "kv_gb_min_group": round(min_group / GB, 2),
        "kv_budget_holds_a_group": min_group <= budget,
        "layout": f"tp={tp}, pp={pp}, dp={dp}" + (" (snapshot model, overlapping training)" if overlapped else ""),
    }


def sglang_estimate(spec: Any, arch: ModelArch, n_samples: int, gpu_memory_gb: float) -> dict[str, Any]:
    """SGLang rollout servers' step estimate (module docstring)."""
    # the servers of the served engine in force (rollout.vllm for vllm: the same bandwidth-bound estimate), else
    # rollout.sglang's, to show what serving would take
    s = spec.rollout_servers if spec.rollout_engine.served else spec.rollout.sglang
    wb = DTYPE_BYTES[spec.model.dtype]
    prompt, new = spec.data.max_prompt_tokens, spec.rollout.max_new_tokens
    weights = stage_params(arch, 1, 1, 0) * wb  # the whole model (embedding and output layer included)
    k_model = kv_bytes_per_token(arch, arch.num_layers, 1, wb)
    engines = s.nodes * s.per_node * s.dp
    kv_tokens = max(s.mem_fraction_static * gpu_memory_gb * GB * s.tp - weights, 0.0) / k_model
    batch = max(1, min(math.ceil(n_samples / engines), int(kv_tokens // (prompt + new))))
    mean_ctx = prompt + new / 2
    step = (weights / s.tp + batch * mean_ctx * k_model / s.tp) / _bandwidth() + SGLANG_STEP_S
    if s.tp > 1:
        step += 2 * arch.num_layers * ALLREDUCE_S
    waves = math.ceil(n_samples / (engines * batch))
    return {
        "seconds": round(waves * new * step, 1),
        "engines": engines,
        "gpus": engines * s.tp,
        "sequences_per_engine": batch,
        "waves": waves,
    }


def estimate_rollout_time(spec: Any, arch: ModelArch, dp: int, gpu_memory_gb: float) -> dict[str, Any]:
    """Both engines' estimates for `spec` (whichever it uses), with the one in force named."""
    n_samples = spec.rollout.prompts_per_step * (spec.rollout.n_samples or 1)
    return {
        "engine": spec.rollout.engine,
        "served": spec.rollout.engine if spec.rollout_engine.served else "sglang",  # whose servers "sglang" sizes
        "samples_per_step": n_samples,
        "max_new_tokens": spec.rollout.max_new_tokens,
        "megatron": megatron_estimate(spec, arch, n_samples, dp),
        "sglang": sglang_estimate(spec, arch, n_samples, gpu_memory_gb),
        "note": "upper bound: every response runs to rollout.max_new_tokens; formula in launch/rollout_time.py",
    }
