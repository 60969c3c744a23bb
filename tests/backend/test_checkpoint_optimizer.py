"""Optimizer state across a resume with changed schedule settings: the Adam moments come back from the checkpoint,
the lr / min_lr / weight decay from the current spec. megatron-core 0.19 pairs saved and current param groups on
a key that includes max_lr (0.16.1 does not), so without the pairing a resume with a new train.lr was refused.
Runs the same on both versions; the pairing itself is also checked on plain dicts."""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.checkpoint import (
    SCHEDULE_KEYS,
    _adopt_schedule_settings,
    load_checkpoint,
    save_checkpoint,
)


def _group(wd_mult: float, max_lr: float, **extra) -> dict:
    return {"params": [], "wd_mult": wd_mult, "lr_mult": 1.0, "is_expert_parallel": False,
            "is_decoupled_lr": False, "max_lr": max_lr, "min_lr": 0.0, **extra}  # fmt: skip


def test_saved_groups_take_the_schedule_of_the_group_they_pair_with() -> None:
    saved = [_group(1.0, 1e-3, end_wd=0.1, start_wd=0.1), _group(0.0, 1e-3, end_wd=0.1, start_wd=0.1)]
    current = [_group(0.0, 4e-3, min_lr=1e-4), _group(1.0, 2e-3, end_wd=0.0, start_wd=0.2)]  # another order
    assert _adopt_schedule_settings(saved, current) == 2
    assert [(g["wd_mult"], g["max_lr"]) for g in saved] == [(1.0, 2e-3), (0.0, 4e-3)]
    assert (saved[0]["start_wd"], saved[0]["end_wd"]) == (0.2, 0.0)
    assert "start_wd" not in saved[1] and "end_wd" not in saved[1] and saved[1]["min_lr"] == 1e-4
    for s, c in ((saved[0], current[1]), (saved[1], current[0])):
        assert {k: s.get(k) for k in SCHEDULE_KEYS} == {k: c.get(k) for k in SCHEDULE_KEYS}


def test_a_saved_group_without_a_counterpart_keeps_its_settings() -> None:
    saved = [_group(1.0, 1e-3), _group(0.5, 1e-3)]
    assert _adopt_schedule_settings(saved, [_group(1.0, 2e-3)]) == 1
    assert [g["max_lr"] for g in saved] == [2e-3, 1e-3]


def _engine(hf, lr: float, min_lr: float = 0.0, weight_decay: float = 0.0):
    from megatron_camopd.backend.engine import Engine, OptimSettings
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch

    arch = ModelArch.from_hf_dir(hf)
    optim = OptimSettings(lr=lr, min_lr=min_lr, weight_decay=weight_decay, total_steps=4)
    return Engine(arch, optim=optim, init_fn=lambda chunks: load_hf_weights(chunks, hf, arch, 0, 1, 0, 1))


def _batch(vocab: int) -> dict:
    n, width = 2, 16
    tokens = torch.randint(0, vocab, (n, width), generator=torch.Generator().manual_seed(0))
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": torch.ones(n, width),
        "sample_weight": torch.ones(n),
        "seq_len": torch.full((n,), width),
    }


def _moments(engine) -> list[torch.Tensor]:
    inner = engine.optimizer.optimizer  # the torch Adam inside megatron-core's wrapper
    return [
        inner.state[p][k].clone() for g in inner.param_groups for p in g["params"] for k in ("exp_avg", "exp_avg_sq")
    ]


def test_resume_with_a_new_lr_keeps_the_moments_and_takes_the_new_schedule(
    megatron_world, tiny_hf_dirs, tmp_path
) -> None:
    from megatron_camopd.backend.loss import LossSpec

    hf = tiny_hf_dirs["qwen3"]
    e = _engine(hf, lr=1e-3, weight_decay=0.01)
    batch = _batch(e.arch.vocab_size)
    e.train_step(batch, LossSpec(loss="sft"))
    path = save_checkpoint(tmp_path / "c", 1, e.models(), e.optimizer, e.scheduler)

    back = _engine(hf, lr=2e-3, min_lr=1e-4, weight_decay=0.02)
    assert not back.optimizer.optimizer.state  # no moments before the load: they come from the checkpoint
    load_checkpoint(path, back.models(), back.optimizer, back.scheduler)
    got, want = _moments(back), _moments(e)
    assert len(got) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert {g["max_lr"] for g in back.optimizer.param_groups} == {2e-3}
    assert {g["min_lr"] for g in back.optimizer.param_groups} == {1e-4}
    assert back.scheduler.num_steps == e.scheduler.num_steps  # the checkpoint's step count
    assert back.train_step(batch, LossSpec(loss="sft"))["lr"] == pytest.approx(2e-3)
