"""HuggingFace <-> Megatron weights for dense Qwen3 / Llama, with tensor- and pipeline-parallel sharding.

Three representations:
* HF state dict (``model.layers.{i}.self_attn.q_proj.weight`` ...), vocabulary ``arch.vocab_size``;
* the *full* Megatron state dict: GPTModel names at TP=1 with GLOBAL layer indices (local layer spec names:
  ``decoder.layers.{i}.input_layernorm.weight``, ``...self_attention.linear_qkv.weight`` ...), vocabulary padded;
  ``linear_qkv`` is interleaved per query group ``[ng, (q_per_group + 2) * head_dim, hidden]`` and
  ``linear_fc1`` is ``[gate; up]``; no ``output_layer`` when embeddings are tied;
* a rank's model chunks: TP shards of the full tensors (vocab/column-parallel rows, row-parallel columns,
  ``linear_fc1`` as ``[gate_r; up_r]``) with local layer indices per PP/VPP stage. TransformerEngine-spec names
  (norms fused into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``) map to the same keys.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_camopd.backend.model import ModelArch
from megatron_camopd.errors import CheckpointError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TE_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# Per-layer HF suffix -> Megatron suffix for tensors that map one to one.
_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # Qwen3 only
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")  # sharded along dim 1
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight",)  # sharded along dim 0
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")  # sharded along dim 0
_FC1 = "mlp.linear_fc1.weight"  # [gate; up], each half sharded along dim 0


# ----------------------------------------------------------------------------- HF <-> full Megatron


def _pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    if weight.shape[0] > padded:
        raise CheckpointError(f"vocabulary {weight.shape[0]} is larger than the padded size {padded}")
    if weight.shape[0] == padded:
        return weight
    pad = weight.new_zeros((padded - weight.shape[0],) + tuple(weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"HF weights: tensor '{key}' is missing")
    return sd[key]


def hf_to_megatron_state_dict(
    hf_sd: Mapping[str, torch.Tensor], arch: ModelArch, padded_vocab_size: int, layers: Iterable[int] | None = None
) -> dict[str, torch.Tensor]:
    """HF state dict -> full (TP=1) Megatron state dict with global layer indices (``layers``: subset to convert)."""
    out: dict[str, torch.Tensor] = {}
    ng, hd = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_attention_heads // ng
    if "model.embed_tokens.weight" in hf_sd:
        out["embedding.word_embeddings.weight"] = _pad_vocab(hf_sd["model.embed_tokens.weight"], padded_vocab_size)
    if "model.norm.weight" in hf_sd:
        out["decoder.final_layernorm.weight"] = hf_sd["model.norm.weight"]
    if not arch.tie_word_embeddings and "lm_head.weight" in hf_sd:
        out["output_layer.weight"] = _pad_vocab(hf_sd["lm_head.weight"], padded_vocab_size)
    for i in range(arch.num_layers) if layers is None else layers:
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_suffix, mg_suffix in _DIRECT.items():
            if hf_suffix in _QK_NORMS and not arch.qk_layernorm:
                continue
            out[mp + mg_suffix] = _need(hf_sd, hp + hf_suffix)
        q = _need(hf_sd, hp + "self_attn.q_proj.weight").reshape(ng, qpg * hd, -1)
        k = _need(hf_sd, hp + "self_attn.k_proj.weight").reshape(ng, hd, -1)
        v = _need(hf_sd, hp + "self_attn.v_proj.weight").reshape(ng, hd, -1)
        out[mp + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        gate = _need(hf_sd, hp + "mlp.gate_proj.weight")
        up = _need(hf_sd, hp + "mlp.up_proj.weight")
        out[mp + _FC1] = torch.cat([gate, up], dim=0)
    return out


def megatron_to_hf_state_dict(full_sd: Mapping[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """Full (TP=1-gathered, global layer index) Megatron state dict -> HF state dict (vocab padding removed).

    Tied models get ``lm_head.weight`` sharing the embedding tensor; ``save_hf`` writes it only once.
    """
    ng, hd = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_attention_heads // ng
    inverse = {mg: hf for hf, mg in _DIRECT.items()}
    hf: dict[str, torch.Tensor] = {}
    for key, value in full_sd.items():
        if key.endswith("_extra_state"):
            continue
        if key == "embedding.word_embeddings.weight":
            hf["model.embed_tokens.weight"] = value[: arch.vocab_size]
        elif key == "decoder.final_layernorm.weight":
            hf["model.norm.weight"] = value
        elif key == "output_layer.weight":
            if not arch.tie_word_embeddings:
                hf["lm_head.weight"] = value[: arch.vocab_size]
        elif (m := _LAYER.match(key)) is not None:
            i, suffix = int(m.group(1)), _TE_RENAMES.get(m.group(2), m.group(2))
            hp = f"model.layers.{i}."
            if suffix in inverse:
                hf[hp + inverse[suffix]] = value
            elif suffix == "self_attention.linear_qkv.weight":
                qkv = value.reshape(ng, (qpg + 2) * hd, -1)
                q, k, v = torch.split(qkv, [qpg * hd, hd, hd], dim=1)
                hf[hp + "self_attn.q_proj.weight"] = q.reshape(-1, qkv.shape[-1])
                hf[hp + "self_attn.k_proj.weight"] = k.reshape(-1, qkv.shape[-1])
                hf[hp + "self_attn.v_proj.weight"] = v.reshape(-1, qkv.shape[-1])
            elif suffix == _FC1:
                gate, up = torch.chunk(value, 2, dim=0)
                hf[hp + "mlp.gate_proj.weight"] = gate
                hf[hp + "mlp.up_proj.weight"] = up
            else:
                raise CheckpointError(f"Megatron state dict: unexpected tensor '{key}'")
        else:
            raise CheckpointError(f"Megatron state dict: unexpected tensor '{key}'")
    if arch.tie_word_embeddings and "model.embed_tokens.weight" in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    return hf


# ----------------------------------------------------------------------------- TP sharding


def _suffix(key: str) -> str:
    m = _LAYER.match(key)
    return m.group(2) if m else key


def tp_shard(key: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of one full Megatron tensor (key in local-spec naming)."""
    if tp_size == 1:
        return full
    suffix = _suffix(key)
    if suffix in _ROW_PARALLEL:
        return torch.chunk(full, tp_size, dim=1)[tp_rank]
    if suffix in _COLUMN_PARALLEL or suffix in _VOCAB_PARALLEL:
        return torch.chunk(full, tp_size, dim=0)[tp_rank]
    if suffix == _FC1:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size)[tp_rank], torch.chunk(up, tp_size)[tp_rank]], dim=0)
    return full  # norms are replicated


def tp_unshard(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``tp_shard``: the full tensor from all TP ranks' shards (in rank order)."""
    if len(shards) == 1:
        return shards[0]
    suffix = _suffix(key)
    if suffix in _ROW_PARALLEL:
        return torch.cat(shards, dim=1)
    if suffix in _COLUMN_PARALLEL or suffix in _VOCAB_PARALLEL:
        return torch.cat(shards, dim=0)
    if suffix == _FC1:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return shards[0]


# ----------------------------------------------------------------------------- model chunks


def _unwrap(chunk: torch.nn.Module) -> tuple[Any, str]:
    """(GPTModel inside DDP / Float16Module wrappers, its state-dict key prefix)."""
    model: Any = chunk
    prefix = ""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model, prefix = model.module, prefix + "module."
    return model, prefix


def chunk_key_map(chunk: torch.nn.Module, arch: ModelArch) -> dict[str, str]:
    """{chunk state-dict key -> full Megatron key} for one model chunk (local -> global layer index)."""
    model, prefix = _unwrap(chunk)
    layers = model.decoder.layers
    mapping: dict[str, str] = {}
    for key in chunk.state_dict():
        if key.endswith("_extra_state"):
            continue
        local = key[len(prefix) :]
        m = _LAYER.match(local)
        if m is not None:
            global_idx = layers[int(m.group(1))].layer_number - 1
            full = f"decoder.layers.{global_idx}.{_TE_RENAMES.get(m.group(2), m.group(2))}"
        elif local == "output_layer.weight" and arch.tie_word_embeddings:
            full = "embedding.word_embeddings.weight"
        else:
            full = local
        mapping[key] = full
    return mapping


def stage_layer_indices(chunks: Iterable[torch.nn.Module]) -> list[int]:
    """Global (0-based) indices of the transformer layers held by these chunks."""
    return sorted({layer.layer_number - 1 for chunk in chunks for layer in _unwrap(chunk)[0].decoder.layers})


def load_full_state_dict_into(
    chunks: Iterable[torch.nn.Module], full_sd: Mapping[str, torch.Tensor], arch: ModelArch, tp_rank: int, tp_size: int
) -> None:
    """Copy this rank's TP shards of a full Megatron state dict into its model chunks (shape-checked)."""
    with torch.no_grad():
        for chunk in chunks:
            params = chunk.state_dict(keep_vars=True)
            for key, full_key in chunk_key_map(chunk, arch).items():
                if full_key not in full_sd:
                    raise CheckpointError(f"weights: tensor for '{key}' ('{full_key}') is missing")
                shard = tp_shard(full_key, full_sd[full_key], tp_rank, tp_size)
                target = params[key]
                if tuple(shard.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"weights: '{full_key}' shard has shape {tuple(shard.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(shard.to(target.dtype))


def read_hf_state_dict(hf_dir: str | Path, keep: Any | None = None) -> dict[str, torch.Tensor]:
    """Read all safetensors shards of ``hf_dir`` (via model.safetensors.index.json when present).

    ``keep(name) -> bool`` restricts which tensors are read (e.g. this pipeline stage's layers only).
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{hf_dir}: no *.safetensors weights found")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(hf_dir / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if keep is None or keep(key):
                    out[key] = handle.get_tensor(key)
    return out


def load_hf_weights(
    model_chunks: Iterable[torch.nn.Module],
    hf_dir: str | Path,
    arch: ModelArch,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
) -> None:
    """Load HF safetensors from ``hf_dir`` into this rank's model chunks (reads only this stage's layers).

    ``pp_rank``/``pp_size`` are implied by the chunks' layer numbers and kept for a readable call site.
    """
    chunks = list(model_chunks)
    layers = stage_layer_indices(chunks)
    wanted = set(layers)

    def keep(name: str) -> bool:
        m = _HF_LAYER.match(name)
        return m is None or int(m.group(1)) in wanted

    hf_sd = read_hf_state_dict(hf_dir, keep)
    padded = arch.padded_vocab_size(tp_size)
    full = hf_to_megatron_state_dict(hf_sd, arch, padded, layers=layers)
    load_full_state_dict_into(chunks, full, arch, tp_rank, tp_size)


def gather_full_state_dict(
    model_chunks: Iterable[torch.nn.Module], arch: ModelArch, tp_group: Any = None, pp_group: Any = None
) -> dict[str, torch.Tensor]:
    """Full (TP=1, global layer index) Megatron state dict on every rank, gathered over TP and PP.

    Groups default to megatron's ``parallel_state`` ones when it is initialised; CPU tensors, float as stored.
    Memory: each rank ends up with the whole model (fine for the converter and small models).
    """
    import torch.distributed as dist

    if dist.is_initialized() and (tp_group is None or pp_group is None):
        from megatron.core import parallel_state as ps

        tp_group = tp_group or ps.get_tensor_model_parallel_group()
        pp_group = pp_group or ps.get_pipeline_model_parallel_group()
    tp_size = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    stage: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        params = chunk.state_dict()
        for key, full_key in chunk_key_map(chunk, arch).items():
            if full_key in stage:  # tied output layer on the last stage duplicates the embedding
                continue
            local = params[key].detach().contiguous()
            if tp_size > 1:
                shards = [torch.empty_like(local) for _ in range(tp_size)]
                dist.all_gather(shards, local, group=tp_group)
                stage[full_key] = tp_unshard(full_key, [s.cpu() for s in shards])
            else:
                stage[full_key] = local.cpu().clone()
    if dist.is_initialized() and dist.get_world_size(pp_group) > 1:
        stages: list[Any] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, stage, group=pp_group)
        merged: dict[str, torch.Tensor] = {}
        for part in stages:
            for key, value in part.items():
                merged.setdefault(key, value)
        stage = merged
    if arch.tie_word_embeddings:
        stage.pop("output_layer.weight", None)
    return dict(sorted(stage.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(key: str) -> tuple[int, int, str]:
    m = _LAYER.match(key)
    if m is not None:
        return (1, int(m.group(1)), m.group(2))
    return (0 if key.startswith("embedding") else 2, 0, key)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def save_hf(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any],
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write an HF model directory: safetensors (sharded with an index above ``max_shard_bytes``), config.json
    and, from ``tokenizer_dir``, the tokenizer files. Tied ``lm_head.weight`` is not written (HF re-ties it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = bool(hf_config.get("tie_word_embeddings", False))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out
