"""Megatron GPTModel from a HuggingFace config: dense Qwen3 / Llama architectures, TransformerConfig, FP8 fields.

``ModelArch.from_hf_config(config_dict)`` validates a HuggingFace ``config.json`` (dense Qwen3 with QK-norm, or
Llama) and rejects what this project cannot reproduce exactly (MoE, sliding window, unsupported RoPE scaling,
biases) with a ``SpecError``. ``transformer_config`` turns it into megatron-core's ``TransformerConfig`` for a
given TP/PP/VPP layout and dtype, and ``build_gpt_model`` builds the (per pipeline stage) ``GPTModel``: local
layer spec on CPU, TransformerEngine spec when CUDA and transformer_engine are importable. The vocabulary is
padded to a multiple of ``128 * tp`` (Megatron's ``make_vocab_size_divisible_by`` convention). Sequence
parallelism works on both specs: the local one swaps megatron-core's torch norm (which refuses SP) for
``SequenceParallelRMSNorm`` (same module, its weight's gradient summed over TP), so SP runs on CPU over gloo too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_camopd.errors import SpecError

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
# Megatron's llama3 RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling defaults).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True)
class ModelArch:
    """The architecture facts of a dense decoder-only HF model that Megatron needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    qk_layernorm: bool
    llama3_rope_factor: float | None = None  # llama3-type RoPE scaling factor, None = no scaling

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> ModelArch:
        """Parse a HuggingFace config dict; ``source`` names the file in error messages."""

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise SpecError(f"{source}: missing required field '{key}'")
            return cfg[key]

        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SpecError(
                f"{source}: model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in _MOE_KEYS:
            if cfg.get(key):
                raise SpecError(f"{source}: mixture-of-experts models are not supported ('{key}' is set)")
        if cfg.get("use_sliding_window") or (model_type == "llama" and cfg.get("sliding_window")):
            raise SpecError(f"{source}: sliding-window attention is not supported")
        layer_types = cfg.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise SpecError(f"{source}: only full attention layers are supported, got layer_types={layer_types}")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise SpecError(f"{source}: '{key}: true' is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise SpecError(f"{source}: hidden_act '{cfg.get('hidden_act')}' is not supported (only silu/SwiGLU)")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads != 0:
            raise SpecError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        head_dim = cfg.get("head_dim")  # may differ from hidden/heads; Megatron's kv_channels honours it
        head_dim = int(head_dim) if head_dim else hidden // heads
        rope_theta, llama3_factor = _parse_rope(cfg, source)
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qk_layernorm=(model_type == "qwen3"),
            llama3_rope_factor=llama3_factor,
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> ModelArch:
        """Read ``<hf_dir>/config.json``."""
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise SpecError(f"{path}: HuggingFace config.json not found")
        return cls.from_hf_config(json.loads(path.read_text()), source=str(path))

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary padded to a multiple of 128 * tp (Megatron convention)."""
        multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)


def _parse_rope(cfg: Mapping[str, Any], source: str) -> tuple[float, float | None]:
    """(rope_theta, llama3 factor or None) from old-style rope_theta/rope_scaling or new-style rope_parameters."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling")
    if scaling:
        params.update(scaling)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        for key, expected in _LLAMA3_FIXED.items():
            if float(params.get(key, expected)) != expected:
                raise SpecError(
                    f"{source}: llama3 rope scaling with {key}={params.get(key)} is not supported "
                    f"(Megatron fixes it at {expected})"
                )
        return theta, float(params.get("factor", 8.0))
    raise SpecError(f"{source}: rope scaling type '{rope_type}' is not supported (supported: default, llama3)")


def transformer_engine_available() -> bool:
    """True when CUDA is usable and transformer_engine can be imported (decides the layer spec)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def fp8_transformer_fields(fp8: Any, check_device: bool = True) -> dict[str, Any]:
    """Map an FP8 spec (mapping or object with enabled, format, recipe, margin, amax_history_len,
    amax_compute_algo) onto TransformerConfig's fp8 fields. Empty dict when FP8 is off; SpecError when a value is
    out of range, or (``check_device``) when CUDA or transformer_engine is missing on this machine. `camopd plan`
    maps a cluster's spec on a login node with ``check_device=False``."""
    if fp8 is None or not _get(fp8, "enabled", False):
        return {}
    fmt = _get(fp8, "format", "hybrid")
    recipe = _get(fp8, "recipe", "delayed")
    algo = _get(fp8, "amax_compute_algo", "max")
    if fmt not in ("e4m3", "hybrid"):
        raise SpecError(f"fp8.format: '{fmt}' is not one of e4m3, hybrid")
    if recipe not in ("delayed", "tensorwise", "blockwise"):
        raise SpecError(f"fp8.recipe: '{recipe}' is not one of delayed, tensorwise, blockwise")
    if algo not in ("max", "most_recent"):
        raise SpecError(f"fp8.amax_compute_algo: '{algo}' is not one of max, most_recent")
    margin = int(_get(fp8, "margin", 0))
    history = int(_get(fp8, "amax_history_len", 1024))
    if margin < 0 or history < 1:
        raise SpecError(f"fp8: margin must be >= 0 and amax_history_len >= 1 (got {margin}, {history})")
    if check_device and not torch.cuda.is_available():
        raise SpecError("fp8.enabled: FP8 training needs a CUDA GPU; none is available on this machine")
    if check_device and importlib.util.find_spec("transformer_engine") is None:
        raise SpecError("fp8.enabled: FP8 needs TransformerEngine (pip install 'megatron-camopd[fp8]')")
    return {
        "fp8": fmt,
        "fp8_recipe": recipe,
        "fp8_margin": margin,
        "fp8_amax_history_len": history,
        "fp8_amax_compute_algo": algo,
    }


def transformer_config(
    arch: ModelArch,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: torch.dtype = torch.float32,
    fp8: Any = None,
    *,
    cluster: bool = False,
    **overrides: Any,
) -> Any:
    """megatron-core TransformerConfig for ``arch`` at the given parallel layout and parameter dtype.

    ``overrides`` are passed through to TransformerConfig (e.g. ``calculate_per_token_loss=True``,
    ``recompute_granularity``, ``sequence_parallel``) and win over the derived fields. ``cluster=True`` builds
    the config a CUDA machine with TransformerEngine would build (fused kernels, batched p2p, FP8 without the
    device check), whatever this machine has: `camopd plan` on a login node.
    """
    from megatron.core.transformer import TransformerConfig

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise SpecError(f"dtype: {dtype} is not one of float32, bfloat16, float16")
    if arch.num_attention_heads % tp or arch.num_kv_heads % tp:
        raise SpecError(
            f"tp={tp} must divide num_attention_heads={arch.num_attention_heads} and "
            f"num_key_value_heads={arch.num_kv_heads}"
        )
    if arch.num_layers % (pp * (vpp or 1)):
        raise SpecError(f"num_hidden_layers={arch.num_layers} is not divisible by pp*vpp = {pp}*{vpp or 1}")
    if arch.intermediate_size % tp:
        raise SpecError(f"tp={tp} must divide intermediate_size={arch.intermediate_size}")
    fields: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        autocast_dtype=dtype,
    )
    if cluster or transformer_engine_available():  # fused kernels come with TransformerEngine
        fields.update(bias_activation_fusion=True, masked_softmax_fusion=True, apply_rope_fusion=True)
    if not cluster and not torch.cuda.is_available():
        fields.update(
            batch_p2p_comm=False
        )  # gloo: batched p2p breaks interleaved PP gradients (measured on megatron-core 0.16.1)
    fields.update(fp8_transformer_fields(fp8, check_device=not cluster))
    fields.update(overrides)
    return TransformerConfig(**fields)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """The local layer spec's RMSNorm (``torch.nn.RMSNorm``, exactly what megatron-core's ``WrappedTorchNorm``
    builds) usable under sequence parallelism. With SP each TP rank normalises its own slice of the sequence, so
    the weight's gradient is a partial sum over that slice; the ``sequence_parallel`` attribute makes
    megatron-core's ``finalize_model_grads`` sum it over TP, as it does for TransformerEngine's ``TENorm``.
    (``WrappedTorchNorm`` asserts SP off only because it does not set that attribute.) Same parameters, same
    state-dict keys, same forward as the norm it replaces."""

    def __init__(
        self,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        if config.normalization != "RMSNorm" or zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise SpecError("sequence parallelism on the local layer spec supports plain RMSNorm only")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        # megatron-core's DDP reads this flag, which torch's Parameter does not declare
        self.weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]


def _local_sequence_parallel_block(layer_spec: Any, config: Any, vp_stage: int | None) -> Any:
    """The local layer spec as a ``TransformerBlockSubmodules`` whose norms (the layers' and the final one) are
    ``SequenceParallelRMSNorm``: megatron-core's linear layers, embedding and output layer already implement
    sequence parallelism; only its torch norm refuses it. Lets SP run (and be tested) on CPU over gloo."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    def swap(spec: Any) -> None:
        subs = getattr(spec, "submodules", None)
        if subs is None:
            return
        for name in vars(subs):
            value = getattr(subs, name)
            if value is WrappedTorchNorm:
                setattr(subs, name, SequenceParallelRMSNorm)
            elif hasattr(value, "submodules"):
                swap(value)

    swap(layer_spec)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=SequenceParallelRMSNorm)


def build_gpt_model(
    arch: ModelArch,
    config: Any,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    parallel_output: bool = True,
    use_transformer_engine: bool | None = None,
) -> Any:
    """Build the GPTModel chunk for this rank's pipeline stage (``vp_stage`` for interleaved PP).

    ``parallel_output=True`` keeps logits vocab-sharded: ``forward`` returns ``[B, S, V_padded / tp]``.
    Requires ``init_distributed`` (model-parallel groups and the RNG tracker) to have run.
    megatron-core 0.19 warns "GPTModel IS DEPRECATED" (bug fixes only; its migration guide points to
    ``HybridModel``). GPTModel still builds, trains and checkpoints there (the suite runs on 0.19.2), so it stays
    until a release removes it; not migrated (noted in issue 29).
    """
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs

    from megatron_camopd.backend.kv_attention import with_kv_attention

    use_te = transformer_engine_available() if use_transformer_engine is None else use_transformer_engine
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    else:
        if getattr(config, "fp8", None):
            raise SpecError("fp8.enabled: FP8 needs the TransformerEngine layer spec")
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec = with_kv_attention(spec, local=not use_te)  # KV-cached decoding without per-step cache copies
    if not use_te and config.sequence_parallel:
        spec = _local_sequence_parallel_block(spec, config, vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.llama3_rope_factor is not None,
        rope_scaling_factor=arch.llama3_rope_factor or 8.0,
        vp_stage=vp_stage,
    )
    _norms_in_params_dtype(model, config.params_dtype)
    return model


def _norms_in_params_dtype(model: Any, dtype: torch.dtype) -> None:
    """The local spec's torch norms are built in fp32 whatever `params_dtype` (TransformerEngine's follow it);
    megatron-core's training casts them with its `Float16Module`, which this project does not use. Left in fp32,
    a bf16 model's norm weights land in the fp16 optimizer's fp32 group, whose `sharded_state_dict` maps only its
    fp16 groups: saving a checkpoint failed ("Param id ... does not match any model sharded param")."""
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm | torch.nn.LayerNorm):
            module.to(dtype)


def build_model_chunks(
    arch: ModelArch, config: Any, parallel_output: bool = True, use_transformer_engine: bool | None = None
) -> list[Any]:
    """All model chunks of this rank (one per virtual pipeline stage), with pre/post-process set per stage.

    ``use_transformer_engine``: the layer spec (None: TransformerEngine when CUDA and TE are available)."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunks.append(
            build_gpt_model(
                arch,
                config,
                pre,
                post,
                vp_stage=stage,
                parallel_output=parallel_output,
                use_transformer_engine=use_transformer_engine,
            )
        )
    return chunks
