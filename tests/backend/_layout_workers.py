"""Workers for the layout tests (sequence parallelism, recompute, per-micro-batch widths), run on spawned gloo ranks.

Each layout builds an `Engine` from the same HF weights, accumulates the gradient of one fixed batch of rows of
different lengths, and returns the loss report, this rank's gradients, the widths the model was run at and how
often each layer's MLP ran (recompute re-runs it in the backward pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
SELECTIVE = {"recompute_granularity": "selective", "recompute_modules": ["mlp", "core_attn"]}
LENGTHS = (5, 11, 7, 3)  # two micro-batches of 2 rows: widths 11 and 7 (12 and 8 at SP / TP=2)
WIDTH = 13


def fixed_batch(with_seq_len: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded rows of LENGTHS in a [4, WIDTH] batch, loss on every real next-token position."""
    g = torch.Generator().manual_seed(0)
    b = len(LENGTHS)
    tokens = torch.zeros((b, WIDTH), dtype=torch.long)
    mask = torch.zeros((b, WIDTH))
    for i, n in enumerate(LENGTHS):
        tokens[i, :n] = torch.randint(0, 300, (n,), generator=g)
        mask[i, : n - 1] = 1.0
    batch = dict(
        tokens=tokens,
        labels=torch.roll(tokens, -1, 1) * (mask > 0),
        loss_mask=mask,
        rollout_lp=torch.zeros(b, WIDTH),
        advantages=torch.randn(b, WIDTH, generator=g) * mask,
        token_weight=mask.clone(),
        sample_weight=torch.ones(b),
    )
    if with_seq_len:
        batch["seq_len"] = torch.tensor(LENGTHS)
    return batch


def run_layout(
    hf_dir: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Any = None,
    fields: dict | None = None,
    with_seq_len: bool = True,
    kind: str = "pg",
) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.engine import Engine
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.loss import LossSpec
    from megatron_camopd.backend.model import ModelArch

    init_distributed(tp, pp, vpp, seed=0)
    arch = ModelArch.from_hf_dir(hf_dir)

    def init(chunks):
        load_hf_weights(
            chunks, hf_dir, arch, ps.get_tensor_model_parallel_rank(), tp, ps.get_pipeline_model_parallel_rank(), pp
        )

    engine = Engine(arch, tp=tp, pp=pp, vpp=vpp, micro_batch_size=2, model_fields=fields or {}, init_fn=init)
    widths: list[int] = []
    mlp_calls = [0]
    for m in engine.models():
        m.register_forward_pre_hook(lambda mod, args: widths.append(int(args[0].shape[1])) if args else None)
        for layer in m.decoder.layers:
            layer.mlp.register_forward_pre_hook(lambda mod, args: mlp_calls.__setitem__(0, mlp_calls[0] + 1))
    stats = engine.accumulate_grads(fixed_batch(with_seq_len), LossSpec(loss=kind, is_weight="none"))
    grads = {n: p.main_grad.detach().clone() for c in engine.chunks for n, p in c.named_parameters()}
    return {
        "stats": stats,
        "grads": grads,
        "widths": widths,
        "mlp_calls": mlp_calls[0],
        "config": {
            k: getattr(engine.config, k)
            for k in ("sequence_parallel", "recompute_granularity", "recompute_method", "recompute_modules")
        },
    }


def layout_suite(rank: int, world: int, hf_dir: Path, vpp_hf_dir: Path) -> dict:
    """Every layout of the test in one spawn of 2 ranks (imports cost ~10 s per spawn)."""
    out = {}
    out["tp2"] = run_layout(hf_dir, tp=2)
    out["tp2_full_width"] = run_layout(hf_dir, tp=2, with_seq_len=False)
    out["tp2_sp"] = run_layout(hf_dir, tp=2, fields={"sequence_parallel": True})
    out["tp2_full"] = run_layout(hf_dir, tp=2, fields=FULL)
    out["tp2_selective"] = run_layout(hf_dir, tp=2, fields=SELECTIVE)
    out["tp2_sp_full"] = run_layout(hf_dir, tp=2, fields={"sequence_parallel": True, **FULL}, kind="sft")
    out["tp2_sft"] = run_layout(hf_dir, tp=2, kind="sft")
    for name, kw in (("pp2", {}), ("vpp2", {"vpp": 2})):
        path = vpp_hf_dir if kw else hf_dir
        out[name] = run_layout(path, pp=2, **kw)
        out[name + "_full_width"] = run_layout(path, pp=2, with_seq_len=False, **kw)
    return out
