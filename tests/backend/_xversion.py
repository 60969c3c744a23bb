"""A checkpoint written by one megatron-core and read by another (tests/backend/test_checkpoint_versions.py).

`python -m tests.backend._xversion save|load CKPT_ROOT HF_DIR` in the interpreter of either version: `save` trains
one step of a tiny student and saves it (model, optimizer, scheduler); `load` loads it into a fresh student. Both
print one JSON line: the megatron-core version, a digest of the weights, or the CheckpointError's message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _engine(hf: Path):
    from megatron_camopd.backend.engine import Engine, OptimSettings
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch

    arch = ModelArch.from_hf_dir(hf)
    return Engine(
        arch,
        optim=OptimSettings(lr=1e-3, total_steps=4),
        init_fn=lambda chunks: load_hf_weights(chunks, hf, arch, 0, 1, 0, 1),
    )


def _digest(engine) -> float:
    return float(sum(p.detach().double().sum() for p in engine.models()[0].parameters()))


def main(mode: str, root: Path, hf: Path) -> dict:
    from megatron_camopd.backend.checkpoint import MCORE_VERSION as mcore
    from megatron_camopd.backend.checkpoint import load_checkpoint, save_checkpoint
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.loss import LossSpec
    from megatron_camopd.errors import CheckpointError

    init_distributed(1, 1)
    e = _engine(hf)
    out: dict = {"megatron_core": mcore}
    if mode == "save":
        n, width = 2, 16
        tokens = torch.randint(0, e.arch.vocab_size, (n, width), generator=torch.Generator().manual_seed(0))
        batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(n, width),
                 "sample_weight": torch.ones(n), "seq_len": torch.full((n,), width)}  # fmt: skip
        e.train_step(batch, LossSpec(loss="sft"))
        out["path"] = str(save_checkpoint(root, 1, e.models(), e.optimizer, e.scheduler))
    else:
        try:
            out["step"] = load_checkpoint(root / "iter_0000001", e.models(), e.optimizer, e.scheduler)["step"]
        except CheckpointError as exc:
            out["error"] = str(exc)
    out["digest"] = _digest(e)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))), flush=True)
