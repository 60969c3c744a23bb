"""Attention modules for KV-cached decoding with megatron-core's `StaticInferenceContext`, plugged in by layer spec.

megatron-core's static KV cache stores keys *before* RoPE and re-rotates the whole cache at every decoding step
(`SelfAttention._adjust_key_value_for_inference` slices `k_pos_emb[:sequence_end]`; only its GPU flash-decode path
pre-rotates), and its local `DotProductAttention` materialises the grouped-query expansion of the whole cache
(`repeat_interleave`) at every step. Both are O(context) copies per token per layer: measured on CPU (hidden 256,
4 layers, batch 16) they made a decoding step 6x slower at 1024 tokens than at 64. Two subclasses remove them,
without touching anything else megatron-core does:

* `KVSelfAttention` rotates each new key once, with its own positions, before it enters the cache, and hands the
  cache to core attention already rotated (`k_pos_emb = None`, so the forward pass skips re-rotating it). RoPE of a
  key depends only on that key and its position, so the values are the ones megatron-core computes. Only the static
  context's non-flash path is overridden; everything else (training, dynamic contexts, flash decode) is the parent's.
* `DecodeDotProductAttention` (local layer spec only; TransformerEngine's attention handles GQA itself) answers a
  one-token query with `torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`, which reads the
  grouped K/V in place; prompts (prefill) and training take the parent's path unchanged.
* With the local spec the cache is stored head-major ([batch, kv heads, tokens, head_dim] in memory), seen through
  a permuted view with megatron-core's logical [tokens, batch, kv heads, head_dim] shape, so every index into it
  reads as before. A decoding step's SDPA then reads each head's filled prefix as one contiguous block; over the
  token-major layout its CPU kernel gathered the strided rows first (measured: the attention kernel alone at
  ~1k tokens of context, hidden 256, batch 16, took about half the time). TE's attention reads token-major
  (`sbhd`) and keeps it. `compact_kv_cache` drops finished rows keeping whichever layout a layer has.

Checked against megatron-core 0.16.1 and 0.19.x (same `_adjust_key_value_for_inference` signature and semantics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def allocate_kv(tokens: int, batch: int, groups: int, dim: int, dtype, device, head_major: bool) -> torch.Tensor:
    """A [tokens, batch, groups, dim] cache tensor; head-major in memory (see the module docstring) or plain."""
    if not head_major:
        return torch.empty(tokens, batch, groups, dim, dtype=dtype, device=device)
    return torch.empty(batch, groups, tokens, dim, dtype=dtype, device=device).permute(2, 0, 1, 3)


def is_head_major(t: torch.Tensor) -> bool:
    """Whether a [tokens, batch, groups, dim] cache tensor is stored head-major (tokens not the outer stride)."""
    return t.size(0) > 1 and t.stride(0) < t.stride(1)


def compact_kv_cache(ctx, keep: torch.Tensor, length: int) -> None:
    """Keep only cache rows `keep` of every layer of a static context (positions [0, length) are copied, in the
    layer's own layout); finished rows stop costing compute."""
    for layer, (k, v) in list(ctx.key_value_memory_dict.items()):
        idx = keep.to(k.device)
        new = []
        for t in (k, v):
            n = allocate_kv(t.size(0), len(keep), t.size(2), t.size(3), t.dtype, t.device, is_head_major(t))
            n[:length] = t[:length].index_select(1, idx)
            new.append(n)
        ctx.key_value_memory_dict[layer] = tuple(new)
    ctx.max_batch_size = len(keep)


class KVSelfAttention(SelfAttention):
    """`SelfAttention` whose static KV cache holds keys already rotated by RoPE (see the module docstring)."""

    def _adjust_key_value_for_inference(
        self,
        inference_context,
        query,
        key,
        value,
        rotary_pos_emb,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        ctx = inference_context if inference_context is not None else inference_params
        if (
            ctx is None
            or not ctx.is_static_batching()
            or self.config.flash_decode
            or rotary_pos_emb is None
            or self.training
        ):
            return super()._adjust_key_value_for_inference(
                ctx,
                query,
                key,
                value,
                rotary_pos_emb,
                rotary_pos_cos,
                rotary_pos_sin,
                rotary_pos_cos_sin,
                sequence_len_offset,
            )
        if self.layer_number not in ctx.key_value_memory_dict:
            head_major = isinstance(self.core_attention, DecodeDotProductAttention)
            ctx.key_value_memory_dict[self.layer_number] = tuple(
                allocate_kv(
                    ctx.max_sequence_length,
                    ctx.max_batch_size,
                    self.num_query_groups_per_partition,
                    dim,
                    t.dtype,
                    t.device,
                    head_major,
                )
                for dim, t in ((self.key_hidden_size, key), (self.val_hidden_size, value))
            )
        k_mem, v_mem = ctx.key_value_memory_dict[self.layer_number]
        b0, s0 = ctx.batch_size_offset, ctx.sequence_len_offset
        b1, s1 = b0 + key.size(1), s0 + key.size(0)
        if b1 > k_mem.size(1) or s1 > k_mem.size(0):
            raise RuntimeError(
                f"KV cache of layer {self.layer_number} holds {k_mem.size(1)} x {k_mem.size(0)} "
                f"(batch x tokens); asked for rows [{b0}, {b1}) and positions [{s0}, {s1})"
            )
        q_pos, k_pos = rotary_pos_emb
        rotated = apply_rotary_pos_emb(key, k_pos[s0:s1], config=self.config, cp_group=self.pg_collection.cp)
        k_mem[s0:s1, b0:b1] = rotated
        v_mem[s0:s1, b0:b1] = value
        if s0 == 0:  # a prefill attends to itself only: the new keys are the cache (contiguous, for the parent)
            return query, rotated, value, (q_pos[s0:s1], None), self.attn_mask_type, None
        return query, k_mem[:s1, b0:b1], v_mem[:s1, b0:b1], (q_pos[s0:s1], None), AttnMaskType.no_mask, None


class DecodeDotProductAttention(DotProductAttention):
    """Local-spec core attention with a grouped-query SDPA fast path for one-token queries (decoding steps)."""

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        fast = (
            query.size(0) == 1
            and not self.training
            and attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
        )
        if not fast:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        # [s, b, heads, hn] -> [b, heads, s, hn] views; SDPA broadcasts the query groups over the K/V groups
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)  # layer scaling cancels out
        # (no fp32 upcast of a half-precision cache: that would copy the whole cache every step; SDPA's CPU and
        # GPU kernels accumulate the softmax in fp32 themselves)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.size(1) != k.size(1))
        return out.to(query.dtype).permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)


def with_kv_attention(layer_spec, local: bool):
    """The layer spec with the KV-cache attention modules (the spec object is modified and returned)."""
    attn = layer_spec.submodules.self_attention
    if attn.module is SelfAttention:
        attn.module = KVSelfAttention
    core = attn.submodules.core_attention
    if local and core is DotProductAttention:
        attn.submodules.core_attention = DecodeDotProductAttention
    return layer_spec
