"""Checkpoints load across layer specs: a local-spec checkpoint (no `_extra_state`) into a model whose modules
carry TransformerEngine-style `_extra_state`, and back; any other missing tensor still fails the load.

TransformerEngine is not installed here, so the TE side is a local-spec model whose attention modules carry an
`_extra_state` object exactly as TE modules do (megatron-core saves it as a ShardedObject); the checkpoints are
real `dist_checkpointing` saves and loads.
"""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.checkpoint import load_checkpoint, save_checkpoint
from megatron_camopd.errors import CheckpointError


class _Fp8State(torch.nn.Module):
    """Carries `_extra_state` like a TE module (its FP8 scaling state); records what a load gave it."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.loaded = value, None

    def get_extra_state(self):
        return torch.tensor([self.value])

    def set_extra_state(self, state) -> None:
        self.loaded = state


def _model(hf_dir, *, te_like: bool = False, extra_param: bool = False):
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.model import ModelArch, build_model_chunks, transformer_config

    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model_chunks(arch, transformer_config(arch), use_transformer_engine=False)
    load_hf_weights(chunks, hf_dir, arch, 0, 1, 0, 1)
    for i, layer in enumerate(chunks[0].decoder.layers):
        if te_like:
            layer.self_attention.fp8 = _Fp8State(float(i + 1))  # as TE attention carries it
        if extra_param:
            layer.self_attention.register_parameter("new_weight", torch.nn.Parameter(torch.ones(3)))
    return chunks


def _params(chunks) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in chunks[0].named_parameters()}


def _perturb(chunks) -> None:
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.01)


def test_local_checkpoint_loads_into_te_like_model_and_back(megatron_world, tiny_hf_dirs, tmp_path) -> None:
    hf = tiny_hf_dirs["qwen3"]
    local = _model(hf)
    _perturb(local)  # weights that differ from the HF ones a fresh model starts from
    path = save_checkpoint(tmp_path / "local", 1, local)
    te = _model(hf, te_like=True)
    assert any(k.endswith("_extra_state") for k in te[0].state_dict())
    load_checkpoint(path, te)  # strict: the missing _extra_state is tolerated, nothing else
    want = _params(local)
    got = _params(te)
    assert want.keys() <= got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(layer.self_attention.fp8.loaded is None for layer in te[0].decoder.layers)

    _perturb(te)
    path2 = save_checkpoint(tmp_path / "te", 2, te)
    back = _model(hf)
    load_checkpoint(path2, back)  # the checkpoint's _extra_state objects are simply not requested
    assert all(torch.equal(v, _params(te)[k]) for k, v in _params(back).items())
    te2 = _model(hf, te_like=True)
    load_checkpoint(path2, te2)  # TE -> TE: the extra state comes back
    states = [layer.self_attention.fp8.loaded for layer in te2[0].decoder.layers]
    assert [float(s[0]) for s in states] == [1.0, 2.0]


def test_other_missing_tensors_still_fail(megatron_world, tiny_hf_dirs, tmp_path) -> None:
    hf = tiny_hf_dirs["qwen3"]
    path = save_checkpoint(tmp_path / "c", 1, _model(hf))
    with pytest.raises(CheckpointError, match="new_weight"):
        load_checkpoint(path, _model(hf, extra_param=True))


def test_bf16_model_with_the_plain_optimizer_saves_and_loads(megatron_world, tiny_hf_dirs, tmp_path) -> None:
    """A bf16 student on the local spec with the (non-distributed) fp16 optimizer: its norm weights are bf16 like
    every other parameter (torch builds them in fp32; left so, they fell in the optimizer's fp32 group, whose
    sharded state dict megatron-core does not map, and the save failed), and the optimizer state round-trips."""
    from megatron_camopd.backend.engine import Engine, OptimSettings
    from megatron_camopd.backend.hf_mapping import load_hf_weights
    from megatron_camopd.backend.loss import LossSpec
    from megatron_camopd.backend.model import ModelArch

    hf = tiny_hf_dirs["qwen3"]
    arch = ModelArch.from_hf_dir(hf)

    def engine() -> Engine:
        return Engine(
            arch,
            dtype="bf16",
            optim=OptimSettings(lr=1e-3, total_steps=2),
            init_fn=lambda chunks: load_hf_weights(chunks, hf, arch, 0, 1, 0, 1),
        )

    e = engine()
    assert {p.dtype for p in e.chunks[0].parameters()} == {torch.bfloat16}
    n, width = 2, 16
    tokens = torch.randint(0, arch.vocab_size, (n, width), generator=torch.Generator().manual_seed(0))
    batch = {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": torch.ones(n, width),
        "sample_weight": torch.ones(n),
        "seq_len": torch.full((n,), width),
    }
    e.train_step(batch, LossSpec(loss="sft"))
    path = save_checkpoint(tmp_path / "bf16", 1, e.models(), e.optimizer, e.scheduler)
    back = engine()
    load_checkpoint(path, back.models(), back.optimizer, back.scheduler)
    assert all(torch.equal(a, b) for a, b in zip(_params(e.models()).values(), _params(back.models()).values()))
    # the same next step from the loaded optimizer state (Adam moments and the fp32 main weights)
    assert back.train_step(batch, LossSpec(loss="sft"))["loss"] == e.train_step(batch, LossSpec(loss="sft"))["loss"]
