"""Per-GPU memory estimate of a spec's training ranks, for `camopd plan` (no GPU, no weights needed).

Terms, in GB (1e9 bytes) on the most loaded pipeline stage of one rank:
- `weights`: the student's parameters on that stage (embedding on the first, output layer on the last, their layers),
  divided by TP, in `model.dtype`.
- `grads`: megatron-core's DDP gradient buffer (`grad_reduce_in_fp32`: 4 bytes a parameter).
- `optimizer`: Adam's fp32 main parameters, m and v (12 bytes a parameter for bf16/fp16 weights, 8 for fp32),
  sharded over DP with the distributed optimizer.
- `activations`: what backward keeps of one micro-batch (`train.micro_batch_size` x the sequence length), per layer
  and token (bf16, flash attention: no score matrix): norm inputs 4h, Q/K/V before and after QK-norm 3(q + kv),
  attention output q, MLP 3f -- 2(4h + 4q + 3kv + 3f) bytes, divided by TP (sequence parallel shards the norm
  inputs too; without it they are replicated), times the micro-batches a 1F1B stage holds (pp). Full recompute
  keeps each layer's input (2h bytes a token) plus one layer recomputed at a time; selective recompute drops the
  recomputed modules' share. The last stage adds the fp32 logits of one micro-batch (vocab / TP). Both
  `activations_no_recompute` and `activations_recompute_full` are reported next to the one in force.
- `inprocess_teachers`: the weights of in-process teachers (and ExOPD's reference) on that stage, at the student's
  layout (their own architecture when given, else the student's).
- `rollout_kv_cache`: `rollout.kv_cache_gb` for the megatron engine (rollouts run between training passes, so the
  peak takes the larger of it and the activations), 0 for SGLang (other nodes) and the reference engine.
- `rollout_snapshot`, `rollout_weight_clones`: overlapped in-process rollouts (`rollout.max_staleness` k > 0 with
  the megatron or reference engine; TP = PP = 1): the second student instance the rollout thread samples with
  (its weights, in `model.dtype`) and one copy of the parameters per batch in flight (k of them, each held until
  the thread loads it; rollout/pipeline.py). Those rollouts run while training runs, so their KV cache then adds
  to the activations instead of sharing their peak. 0 otherwise.
- `overhead`: CUDA context, NCCL buffers and allocator fragmentation (a fixed 3 GB).

Beside the GPU terms, `checkpoint_host_gb`: the optimizer state one rank stages in host memory at a checkpoint
save (backend/checkpoint_format.py): with the distributed optimizer and `checkpoint.optimizer_format:
fully_reshardable` the whole replica's (gathered over DP: the optimizer bytes undivided), with `dp_reshardable`
the rank's own DP shard; without the distributed optimizer its whole state either way.

It is an estimate (Qwen3-8B TP2/PP2 with a 36,864-token micro-batch needs ~120 GB of activations on
stage 0 without recompute and ~11 GB with full recompute); what it is for is telling a spec that cannot fit from
one that can, and which term to shrink.
"""

from __future__ import annotations

from typing import Any

from megatron_camopd.backend.model import ModelArch

GB = 1e9
OVERHEAD_GB = 3.0
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def layer_params(arch: ModelArch) -> int:
    """Parameters of one transformer layer (attention, SwiGLU MLP, norms)."""
    h, f = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    norms = 2 * h + (2 * arch.head_dim if arch.qk_layernorm else 0)
    return h * (q + 2 * kv) + q * h + 3 * h * f + norms


def stage_params(arch: ModelArch, tp: int, pp: int, stage: int) -> float:
    """Parameters one TP rank of pipeline stage `stage` holds."""
    embedding = arch.padded_vocab_size(tp) * arch.hidden_size
    n = layer_params(arch) * arch.num_layers / pp
    if stage == 0:
        n += embedding
    if stage == pp - 1 and (not arch.tie_word_embeddings or pp > 1):
        n += embedding  # the output layer (a tied one is a copy on the last stage when pp > 1)
    return n / tp


def activation_bytes_per_token_layer(
    arch: ModelArch, tp: int, sequence_parallel: bool, selective: list[str]
) -> tuple[float, float]:
    """(bytes a token a layer kept for backward, of which recomputed by `selective`)."""
    h, f = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    norm = 2 * 4 * h / (tp if sequence_parallel else 1)  # inputs and outputs of the two RMSNorms
    attn = 2 * (4 * q + 3 * kv) / tp
    mlp = 2 * 3 * f / tp
    dropped = {"layernorm": norm / 2, "mlp": mlp, "core_attn": 2 * q / tp}  # flash attention stores little
    return norm + attn + mlp, sum(dropped[m] for m in selective)


def estimate(spec: Any, arch: ModelArch, teacher_archs: list[ModelArch] | None = None) -> dict[str, Any]:
    """The per-GPU estimate (`teacher_archs`: the in-process teachers' and the reference's architectures; default
    the student's for each): {"terms": {name: GB}, "total": GB, "stage": the stage estimated, "largest": name,
    "activations_no_recompute": GB, "activations_recompute_full": GB}."""
    p, t = spec.parallel, spec.train
    tp, pp = p.tp, p.pp
    world = spec.launcher.world_size if spec.launcher is not None else tp * pp * (p.dp or 1)
    dp = max(world // (tp * pp), 1)
    weight_bytes = DTYPE_BYTES[spec.model.dtype]
    tokens = t.micro_batch_size * spec.seq_length
    layers = arch.num_layers / pp
    per_token, recomputed = activation_bytes_per_token_layer(arch, tp, p.sequence_parallel, p.selective_modules)
    layer_input = 2 * arch.hidden_size / (tp if p.sequence_parallel else 1)
    in_flight = pp  # micro-batches a 1F1B first stage holds
    no_recompute = per_token * tokens * layers * in_flight
    full = layer_input * tokens * layers * in_flight + per_token * tokens
    kept = {
        "none": no_recompute,
        "full": full,
        "selective": (per_token - recomputed) * tokens * layers * in_flight + recomputed * tokens,
    }[p.recompute]
    logits = 4 * tokens * arch.padded_vocab_size(tp) / tp
    if teacher_archs is None:
        method = spec.method.method_class()
        frozen = [c for c in spec.teachers.values() if c.kind == "megatron"] if method.needs_teachers else []
        teacher_archs = [arch] * (len(frozen) + int(method.needs_reference))
    r, engine = spec.rollout, spec.rollout_engine  # the engine registry's entry (engines.py)
    kv = r.kv_cache_gb * GB if engine.kv_cache else 0.0
    overlapped = r.max_staleness > 0 and not engine.served  # in process, on a thread beside the trainer
    best: dict[str, Any] | None = None
    for stage in sorted({0, pp - 1}):
        params = stage_params(arch, tp, pp, stage)
        optimizer = params * (12 if weight_bytes < 4 else 8) / (dp if t.distributed_optimizer else 1)
        acts = kept + (logits if stage == pp - 1 else 0.0)
        terms = {
            "weights": params * weight_bytes,
            "grads": params * 4,
            "optimizer": optimizer,
            "activations": acts,
            "inprocess_teachers": sum(stage_params(a, tp, pp, stage) for a in teacher_archs) * weight_bytes,
            "rollout_kv_cache": kv,
            "rollout_snapshot": params * weight_bytes if overlapped else 0.0,
            "rollout_weight_clones": r.max_staleness * params * weight_bytes if overlapped else 0.0,
            "overhead": OVERHEAD_GB * GB,
        }
        # rollouts and training passes take turns, unless they overlap in process
        total = sum(terms.values()) - (0.0 if overlapped else min(acts, kv))
        if best is None or total > best["total"]:
            best = {
                "terms": terms,
                "total": total,
                "stage": stage,
                "activations_no_recompute": no_recompute + (logits if stage == pp - 1 else 0.0),
                "activations_recompute_full": full + (logits if stage == pp - 1 else 0.0),
            }
    assert best is not None
    params = stage_params(arch, tp, pp, best["stage"])
    gathered = t.distributed_optimizer and spec.checkpoint.optimizer_format == "fully_reshardable"
    shard = dp if t.distributed_optimizer and not gathered else 1
    best["checkpoint_host_gb"] = params * (12 if weight_bytes < 4 else 8) / shard
    out = {k: (round(v / GB, 2) if isinstance(v, float) else v) for k, v in best.items() if k != "terms"}
    terms = {k: round(v / GB, 2) for k, v in best["terms"].items()}
    out["terms"] = terms
    out["largest"] = max(terms, key=lambda k: terms[k])
    out["peak_note"] = (
        "total = the terms' sum (rollouts overlap training in process)"
        if overlapped
        else "total = the terms' sum less the smaller of activations and rollout_kv_cache (not at once)"
    )
    return out
