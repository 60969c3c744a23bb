"""The model behind `camopd serve`: a megatron-core GPTModel in a world of one that scores, samples and takes new
weights in place -- the CPU stand-in of an SGLang server of the student (and of a teacher).

Scoring is `MegatronScorer`'s. Sampling is the in-process `megatron` engine (`rollout.kv_engine.MegatronSampler`,
KV-cached) on the served chunks, seeded by each request's `sampling_seed` exactly as `sample_seed` streams seed
the in-process engine, so a served rollout equals the in-process one for the same seed and weights. New weights
come from disk (`load_from_disk`: a HF dir or a camopd checkpoint, same architecture) or from a trainer over a
weights-update process group (`init_group` + `receive`: SGLang's `init_custom_process_group` recipe, imported
from the trainer's side `rollout/weight_sync.py` -- a TCP rendezvous at the trainer's address, the store prefixed
with the group name -- gloo on CPU, nccl on GPU; a bucket's broadcasts are queued and waited for together, as
SGLang receives them), as HF
tensors mapped onto Megatron's layout with `backend.hf_mapping`. `hf_weight(name)` reads one back in HF naming.
Scoring and sampling may run on several of the server's worker threads at once (each call builds its own
sampler and KV cache); weight updates run alone (the server's `ModelLock`), so weights never change under a batch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..backend.hf_mapping import (
    _DIRECT,
    chunk_key_map,
    gather_full_state_dict,
    hf_to_megatron_state_dict,
    load_hf_weights,
    megatron_to_hf_state_dict,
)
from ..backend.model import ModelArch
from ..data.tokenizer import Tokenizer
from ..errors import CheckpointError
from ..rollout.sampler import InProcessModel
from ..rollout.sampling import Rollout, SamplingParams
from ..rollout.weight_sync import init_custom_process_group
from .megatron_scorer import MegatronScorer, checkpoint_kind, load_frozen

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF tensors that form one Megatron tensor, in hf_mapping's concatenation order
_TOGETHER = (
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ServedModel(MegatronScorer):
    """A `MegatronScorer` that also samples and updates its weights (see the module docstring)."""

    def __init__(
        self,
        teacher,
        tokenizer: Tokenizer | None,
        *,
        model_path: str,
        tokenizer_path: str | None,
        context_length: int,
        eos_id: int | None,
        micro_batch_size: int = 8,
    ) -> None:
        super().__init__(
            teacher, tokenizer, model_path=model_path, tokenizer_path=tokenizer_path, micro_batch_size=micro_batch_size
        )
        self.arch: ModelArch = teacher.arch
        self.context_length = int(context_length)
        self.eos_id = eos_id
        self.groups: dict[str, Any] = {}  # weights-update process groups by name
        self._pending: dict[str, torch.Tensor] = {}  # HF tensors waiting for their siblings (q/k/v, gate/up)
        self._hf_shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def chunks(self) -> list:
        return self.teacher.chunks

    # ------------------------------------------------------------------ sampling
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], ignore_eos: bool = False
    ) -> list[Rollout]:
        """One rollout per prompt with the in-process megatron engine (world of one)."""
        from ..backend.cpu_runtime import activate_cpu_runtime
        from ..rollout.kv_engine import MegatronSampler

        activate_cpu_runtime()  # per thread: the server works in a worker thread
        model = InProcessModel(
            chunks=self.chunks,
            groups=self.teacher.groups,
            vocab_size=self.vocab_size(),
            max_context=self.context_length,
            pad_id=self.teacher.pad_id,
            eos_id=None if ignore_eos else self.eos_id,
        )
        return MegatronSampler(model, kv_cache_gb=4.0).generate(prompts, params, seeds)

    # ------------------------------------------------------------------ weights in HF naming
    def hf_state(self) -> dict[str, torch.Tensor]:
        """The served weights as a HF state dict (TP=1: no communication)."""
        return megatron_to_hf_state_dict(gather_full_state_dict(self.chunks, self.arch), self.arch)

    def hf_weight(self, name: str) -> torch.Tensor:
        state = self.hf_state()
        if name not in state:
            raise KeyError(name)
        return state[name]

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._hf_shapes is None:
            self._hf_shapes = {k: tuple(v.shape) for k, v in self.hf_state().items()}
        return self._hf_shapes

    def _copy_full(self, full: dict[str, torch.Tensor]) -> None:
        """Copy full (TP=1) Megatron tensors into the served chunks; keys not given keep their values."""
        with torch.no_grad():
            for chunk in self.chunks:
                params = chunk.state_dict(keep_vars=True)
                for key, full_key in chunk_key_map(chunk, self.arch).items():
                    if full_key in full:
                        params[key].copy_(full[full_key].to(params[key].dtype))

    def apply_hf(self, tensors: dict[str, torch.Tensor]) -> int:
        """Copy HF-named tensors into the model; q/k/v and gate/up wait until all parts of their Megatron tensor
        came (a bucket may split them). Returns how many tensors were applied."""
        shapes = self.hf_shapes()
        for name, t in tensors.items():
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue  # tied: the embedding is the output layer
            if name not in shapes:
                raise CheckpointError(f"names: '{name}' is not a weight of the served {self.arch.model_type} model")
            if tuple(t.shape) != shapes[name]:
                raise CheckpointError(
                    f"shapes: '{name}' has shape {tuple(t.shape)}, the served model expects {shapes[name]}"
                )
            self._pending[name] = t
        full: dict[str, torch.Tensor] = {}
        applied = 0
        top = {k: self._pending.pop(k) for k in list(self._pending) if _HF_LAYER.match(k) is None}
        if top:
            full.update(hf_to_megatron_state_dict(top, self.arch, self._padded_vocab(), layers=[]))
            applied += len(top)
        for name in list(self._pending):
            m = _HF_LAYER.match(name)
            if name not in self._pending or m is None:
                continue
            i, suffix = int(m.group(1)), m.group(2)
            group = next((g for g in _TOGETHER if suffix in g), (suffix,))
            keys = [f"model.layers.{i}.{s}" for s in group]
            if all(k in self._pending for k in keys):
                full.update(_layer_part(i, group, [self._pending.pop(k) for k in keys], self.arch))
                applied += len(keys)
        self._copy_full(full)
        return applied

    def _padded_vocab(self) -> int:
        return int(self.chunks[0].embedding.word_embeddings.weight.shape[0])

    # ------------------------------------------------------------------ updates
    def load_from_disk(self, path: str) -> str:
        """Load a HF dir or camopd checkpoint of the same architecture in place; returns a message."""
        from ..backend.checkpoint import find_model_meta, load_model_only, resolve_checkpoint

        kind = checkpoint_kind(path)
        meta_dir = Path(path) if kind == "hf" else find_model_meta(path)
        arch = ModelArch.from_hf_dir(meta_dir)
        if arch != self.arch:
            diff = [f.name for f in dataclasses.fields(arch) if getattr(arch, f.name) != getattr(self.arch, f.name)]
            raise CheckpointError(f"model_path: {path} is another architecture (differs in {', '.join(diff)})")
        if kind == "hf":
            load_hf_weights(self.chunks, path, self.arch, 0, 1)
        else:
            load_model_only(resolve_checkpoint(path), self.chunks)
        self._pending.clear()
        return f"loaded {kind} weights from {path}"

    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        timeout_s: float = 600.0,
    ) -> None:
        """Join a trainer's weights-update group as rank `rank_offset` (updates are applied by one thread)."""
        if group_name in self.groups:
            raise ValueError(f"group_name: a weights update group named {group_name!r} already exists")
        pg = init_custom_process_group(
            backend, f"tcp://{master_address}:{master_port}", world_size, rank_offset, group_name, timeout_s
        )
        self.groups[group_name] = pg

    def destroy_group(self, group_name: str) -> None:
        pg = self.groups.pop(group_name, None)
        if pg is None:
            raise KeyError(group_name)
        dist.destroy_process_group(pg)

    def receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str) -> int:
        """Receive one bucket (a broadcast from group rank 0 per tensor, in order) and apply it."""
        pg = self.groups[group_name]
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        got = {
            name: torch.empty(tuple(shape), dtype=DTYPES[dt], device=dev)
            for name, dt, shape in zip(names, dtypes, shapes)
        }
        works = [dist.broadcast(t, group=pg, group_src=0, async_op=True) for t in got.values()]
        for w in works:
            w.wait()
        return self.apply_hf({name: t.cpu() for name, t in got.items()})


def _layer_part(i: int, group: tuple[str, ...], parts: list[torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """The full Megatron tensor of layer `i` made of the HF tensors `group` (hf_mapping's layout)."""
    mp = f"decoder.layers.{i}."
    if group == _TOGETHER[0]:
        ng, hd = arch.num_kv_heads, arch.head_dim
        q, k, v = parts
        qkv = torch.cat([q.reshape(ng, -1, q.shape[-1]), k.reshape(ng, hd, -1), v.reshape(ng, hd, -1)], dim=1)
        return {mp + "self_attention.linear_qkv.weight": qkv.reshape(-1, q.shape[-1])}
    if group == _TOGETHER[1]:
        return {mp + "mlp.linear_fc1.weight": torch.cat(parts, dim=0)}
    return {mp + _DIRECT[group[0]]: parts[0]}


def load_served_model(
    path: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    context_length: int | None = None,
    micro_batch_size: int = 8,
) -> ServedModel:
    """A HF dir or camopd checkpoint as a TP=1 `ServedModel` in this process (fp32)."""
    m = load_frozen(path, tokenizer_dir, micro_batch_size=micro_batch_size)
    tokenizer = m.tokenizer
    return ServedModel(
        m.teacher,
        tokenizer,
        model_path=str(m.model_path.resolve()),
        tokenizer_path=str(m.tok_dir.resolve()) if tokenizer is not None else None,
        context_length=context_length or m.teacher.arch.max_position_embeddings,
        eos_id=tokenizer.eos_id if tokenizer is not None else _config_eos(m.meta),
        micro_batch_size=micro_batch_size,
    )


def _config_eos(meta: Path) -> int | None:
    eos = json.loads((meta / "config.json").read_text()).get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
