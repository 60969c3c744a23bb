"""The `megatron` rollout engine: KV-cached decoding through megatron-core's inference context on the student's
own model chunks (the default in process).

Per batch of prompts: one prefill forward over the shortest prompt length, then one token per forward with a
`StaticInferenceContext` KV cache. Every row of a batch occupies the same cache positions (no padding inside
the cache): a row whose prompt is longer than the prefill feeds its remaining prompt tokens one per step (its
sampled outputs are ignored until its prompt is consumed), as megatron-core's own static text generation does,
so RoPE positions and attention are exact for every row with no attention mask. Rows are sorted by prompt
length and grouped so that this tail stays short (see `plan_groups`).

Layouts: TP shards the cache by key/value head groups (each rank caches its own heads) and `runtime_gather_output`
gathers only the last position's logits; PP keeps each stage's layers' cache on that stage and passes the
step's hidden states through the stages with megatron-core's inference p2p (`recv_from_prev_pipeline_rank_` /
`send_to_next_pipeline_rank`); the last stage samples and broadcasts the step's tokens and statistics to every
stage. Interleaved (virtual) pipelining is not supported by megatron-core's inference and is refused.

Finished rows stop costing compute: their cache rows are dropped (the cache is compacted) as soon as they
finish. With FP8 every forward's rows are padded to a multiple of 16 (filler rows, never read). KV memory is bounded
by `kv_cache_gb` per rank, counting the FP8 filler rows: a group of `rows` allocates
    ceil(rows / m) * m * min(longest prompt + max_new_tokens, max_context) * kv_bytes_per_token <= kv_cache_gb * 2**30
(m = 16 under FP8, else 1), with kv_bytes_per_token = 2 (K and V) * layers on this rank * (kv heads / tp) *
head_dim * bytes per element. A budget that cannot hold one padded row of max_context tokens is refused when the
engine is built (`camopd plan` shows the KV term before that).

Sampling is the shared seeded inverse-CDF of `rollout/sampling.py`: for the same seeds this engine samples the
tokens the `reference` engine samples, up to float rounding (greedy decoding: identical tokens).

State shared with training (the GPU path, megatron-core 0.16-0.19 and TransformerEngine 2.x):
- decoding runs under `torch.no_grad()`, never `torch.inference_mode()`: what the libraries build lazily on a
  rollout's first forward is kept and reused by training -- megatron-core's RoPE table (`RotaryEmbedding.forward`
  is an `lru_cache`; its `inv_freq` moves to the GPU there), TE's FP8 scale/amax state -- and an inference
  tensor there breaks the next training step ("Inference tensors cannot be saved for backward": full recompute
  and TE's fused RoPE save the table; TE updates its FP8 state in place). `no_grad` also keeps TE from
  all-reducing amaxes at each decode forward (it reduces only when grad is enabled), so DP ranks may decode
  different numbers of steps.
- FP8 weights: TE recasts a layer's FP8 copy of its weight only on a forward with `is_first_microbatch` set, which
  megatron-core's training schedule sets on its first micro-batch; `generate` sets it on every such module before
  its first forward (`refresh_weight_caches`), so a rollout after an optimizer step samples with the new weights,
  not with the previous step's FP8 copies.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_camopd.backend.cpu_runtime import cpu_runtime_active
from megatron_camopd.backend.engine import unwrap
from megatron_camopd.backend.forward import comm_device
from megatron_camopd.backend.kv_attention import compact_kv_cache
from megatron_camopd.engines import names
from megatron_camopd.errors import SpecError
from megatron_camopd.rollout.sampler import EngineOptions, InProcessModel, OnFinish
from megatron_camopd.rollout.sampling import (
    Rollout,
    SamplingParams,
    all_finished,
    make_rollout,
    sample_uniforms,
    token_stats,
)

_STATS = ("token", "logprob", "entropy", "top1")


def kv_bytes_per_token(models: list) -> int:
    """KV cache bytes one token costs on this rank (all of its layers, its share of the KV heads)."""
    cfg = models[0].config
    layers = sum(len(m.decoder.layers) for m in models)
    tp = cfg.tensor_model_parallel_size
    groups = (cfg.num_query_groups or cfg.num_attention_heads) // tp
    return 2 * layers * groups * cfg.kv_channels * cfg.params_dtype.itemsize


def refresh_weight_caches(models: list) -> int:
    """Make the next forward of every TE module that caches a cast copy of its weight (FP8) recast it, as
    megatron-core's schedule does for a step's first micro-batch (`MegatronModule.set_is_first_microbatch`, which
    does it only under FP8; TE ignores the flag without FP8). Returns how many modules were reset."""
    n = 0
    for model in models:
        for module in model.modules():
            if hasattr(module, "is_first_microbatch"):
                module.is_first_microbatch = True
                n += 1
    return n


def plan_groups(
    prompt_lens: list[int],
    max_new: int,
    bytes_per_token: int,
    budget_bytes: float,
    row_multiple: int = 1,
    max_context: int | None = None,
) -> list[list[int]]:
    """Decode groups (lists of prompt indices, each sorted by prompt length).

    Sorted by length (stable); a group is closed when one more row would exceed the KV budget, or would make the
    group's forced prompt tail (longest - shortest prompt) longer than max(64, max_new // 4) steps. The budget
    counts the cache the group really allocates: its rows padded to `row_multiple` (FP8's filler rows hold cache
    too) times min(longest prompt + max_new, max_context) tokens. A single row that alone exceeds the budget
    still forms a group (`MegatronSampler` refuses a budget that cannot hold one padded row of max_context).
    """
    order = sorted(range(len(prompt_lens)), key=lambda i: prompt_lens[i])
    spread = max(64, max_new // 4)

    def cache_bytes(rows: int, longest: int) -> int:
        tokens = longest + max_new if max_context is None else min(max_context, longest + max_new)
        return -(-rows // row_multiple) * row_multiple * tokens * bytes_per_token

    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur:
            too_big = cache_bytes(len(cur) + 1, prompt_lens[i]) > budget_bytes
            if too_big or prompt_lens[i] - prompt_lens[cur[0]] > spread:
                groups.append(cur)
                cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


class MegatronSampler:
    engine = "megatron"

    @classmethod
    def create(cls, model: InProcessModel, options: EngineOptions) -> MegatronSampler:
        """The registry's constructor (engines.py): `rollout.kv_cache_gb` of KV cache per rank."""
        return cls(model, kv_cache_gb=options.kv_cache_gb)

    def __init__(self, model: InProcessModel, kv_cache_gb: float = 16.0) -> None:
        from megatron.core.inference.communication_utils import (
            recv_from_prev_pipeline_rank_,
            send_to_next_pipeline_rank,
        )

        self.model = model
        self.models = [unwrap(c) for c in model.chunks]
        if len(self.models) > 1:
            raise SpecError(
                "rollout.engine: megatron-core's inference does not support interleaved pipelining "
                f"(parallel.vpp); use rollout.engine: {' | '.join(names(interleaved_pp=True))}"
            )
        self.kv_budget = float(kv_cache_gb) * 2**30
        self._recv, self._send = recv_from_prev_pipeline_rank_, send_to_next_pipeline_rank
        g = model.groups
        self.pp_size, self.pp_rank = g.pp_size, g.pp_rank
        self.first, self.last = self.pp_rank == 0, self.pp_rank == self.pp_size - 1
        # rows per forward are padded to a multiple of this: TransformerEngine's FP8 GEMMs need the token
        # dimension (rows x tokens) divisible by 8, 16 for every recipe (TransformerEngine's FP8 GEMM alignment)
        self.row_multiple = 16 if getattr(self.models[0].config, "fp8", None) else 1
        need = kv_bytes_per_token(self.models) * self.row_multiple * model.max_context
        if need > self.kv_budget:
            padded = f" padded to {self.row_multiple} rows (FP8)" if self.row_multiple > 1 else ""
            raise SpecError(
                f"rollout.kv_cache_gb: {kv_cache_gb:g} GiB cannot hold one decode group: a row of {model.max_context} "
                f"tokens{padded} needs {need / 2**30:.2f} GiB of KV cache on this rank; raise rollout.kv_cache_gb "
                f"(and check `camopd plan`) or use a served rollout.engine: {' | '.join(names(served=True))}"
            )

    def update_weights(self, step: int) -> dict[str, float]:
        return {}  # decodes with the trainer's own chunks

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ one forward through the pipeline
    def _forward(self, tokens: torch.Tensor, ctx) -> torch.Tensor | None:
        """Run `tokens` [n, s] at cache positions [offset, offset + s); the last stage returns [n, V] fp32 logits
        of the last position (true vocabulary), other stages None."""
        model = self.models[0]
        n, s = tokens.shape
        dev = comm_device()
        pos = torch.arange(ctx.sequence_len_offset, ctx.sequence_len_offset + s, device=dev).expand(n, s)
        if not self.first:
            buf = torch.empty((s, n, model.config.hidden_size), dtype=model.config.pipeline_dtype, device=dev)
            self._recv(buf, self.model.groups.pp)
            model.set_input_tensor(buf)
        out = model(tokens.to(dev), pos, None, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += s
        if not self.last:
            self._send(out.to(model.config.pipeline_dtype).contiguous(), self.model.groups.pp)
            return None
        return out[:, -1, : self.model.vocab_size].float()

    def _share(self, stats: torch.Tensor | None, n: int) -> torch.Tensor:
        """[n, 4] float64 (token, logprob, entropy, top1) from the last stage to every stage of the pipeline, on
        the CPU (one device-to-host copy per decode step)."""
        if self.pp_size == 1:
            assert stats is not None, "a single stage computes the stats itself"
            return stats.cpu()
        g = self.model.groups.pp
        if self.last:
            assert stats is not None, "the last stage computes the stats"
            buf = stats.to(comm_device())
        else:
            buf = torch.empty((n, 4), dtype=torch.float64, device=comm_device())
        dist.broadcast(buf, src=dist.get_global_rank(g, self.pp_size - 1), group=g)
        return buf.cpu()

    # ------------------------------------------------------------------ decoding
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_finish: OnFinish | None = None
    ) -> list[Rollout]:
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        m = self.model
        results: list[Rollout | None] = [None] * len(prompts)

        def done(i: int, out: dict, reason: str) -> None:
            results[i] = r = make_rollout(prompts[i], out, reason, {"engine": self.engine})
            if on_finish is not None:
                on_finish(i, r)

        live = []
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= m.max_context or params.max_new_tokens <= 0:
                done(i, {k: [] for k in _STATS}, "context")
            else:
                live.append(i)
        if not live:
            return all_finished(results)
        max_new = min(params.max_new_tokens, m.max_context - min(len(prompts[i]) for i in live))
        groups = plan_groups(
            [len(prompts[i]) for i in live],
            max_new,
            kv_bytes_per_token(self.models),
            self.kv_budget,
            self.row_multiple,
            m.max_context,
        )
        model = self.models[0]
        sp = bool(model.config.sequence_parallel)
        for c in self.models:
            c.eval()
        if sp:  # megatron-core's inference runs without sequence parallelism (as its text generation does)
            set_model_to_sequence_parallel(model, False)
        refresh_weight_caches(self.models)  # FP8: recast the weights the optimizer changed (module docstring)
        try:
            with torch.no_grad():  # not inference_mode: see the module docstring
                for group in groups:
                    rows = [live[j] for j in group]
                    self._decode_group(rows, prompts, params, [seeds[i] for i in rows], max_new, done)
        finally:
            if sp:
                set_model_to_sequence_parallel(model, True)
        return all_finished(results)

    def _decode_group(
        self, rows: list[int], prompts, params: SamplingParams, seeds: list[int], max_new: int, done
    ) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        m = self.model
        lens = [len(prompts[i]) for i in rows]
        n, p0 = len(rows), min(lens)
        mult = self.row_multiple
        # cache row r decodes group member slot[r]; None marks a filler row (FP8 width padding), never read
        slot: list[int | None] = list(range(n)) + [None] * (-n % mult)
        ctx = StaticInferenceContext(len(slot), min(m.max_context, max(lens) + max_new))
        # drawn on the CPU (rollout/sampling.py), kept where the last stage's logits are
        uniforms = sample_uniforms(seeds, max_new).to(comm_device()) if self.last else None
        stops = set(params.stop_token_ids) | ({m.eos_id} if m.eos_id is not None else set())
        out: list[dict[str, list]] = [{k: [] for k in _STATS} for _ in rows]
        prefill = torch.tensor([prompts[rows[g if g is not None else n - 1]][:p0] for g in slot], dtype=torch.long)
        logits = self._forward(prefill, ctx)
        shim = _bypass_cpu_shim() if cpu_runtime_active() else contextlib.nullcontext()
        with shim:
            while any(g is not None for g in slot):
                s = ctx.sequence_len_offset  # tokens in the cache; the logits predict position s
                past = [(r, g) for r, g in enumerate(slot) if g is not None and s >= lens[g]]  # rows past their prompt
                gen = [r for r, _ in past]
                stats = None
                if gen and self.last:
                    assert logits is not None and uniforms is not None, "the last stage has the logits"
                    u = uniforms[[g for _, g in past], [s - lens[g] for _, g in past]]
                    if len(gen) < logits.size(0):  # rows still in their prompt, or FP8 fillers
                        logits = logits[torch.tensor(gen, device=logits.device)]
                    st = token_stats(logits, u, params)
                    stats = torch.stack([st[k].double() for k in _STATS], dim=1)
                # one device-to-host copy and one conversion per step; the loop below reads python floats only
                rows_stats = self._share(stats, len(gen)).tolist() if gen else []
                stat_of = dict(zip(gen, rows_stats))
                nxt: list[int] = []
                for r, g in enumerate(slot):
                    if g is None:
                        nxt.append(m.pad_id)
                        continue
                    if r not in stat_of:
                        nxt.append(prompts[rows[g]][s])  # still consuming its prompt
                        continue
                    tok, lp, ent, top1 = stat_of[r]
                    tok = int(tok)
                    o = out[g]
                    o["token"].append(tok)
                    o["logprob"].append(lp)
                    o["entropy"].append(ent)
                    o["top1"].append(int(top1))
                    reason = (
                        "stop"
                        if tok in stops
                        else "length"
                        if len(o["token"]) >= params.max_new_tokens
                        else "context"
                        if s + 1 >= m.max_context
                        else None
                    )
                    if reason is not None:
                        done(rows[g], o, reason)
                        slot[r] = None
                    nxt.append(tok)
                live = [r for r, g in enumerate(slot) if g is not None]
                if not live:
                    break
                keep = live + [r for r, g in enumerate(slot) if g is None][: -len(live) % mult]
                if len(keep) < len(slot):  # finished rows leave the cache (fillers only to keep the multiple)
                    compact_kv_cache(ctx, torch.tensor(keep), s)
                    slot, nxt = [slot[r] for r in keep], [nxt[r] for r in keep]
                logits = self._forward(torch.tensor(nxt, dtype=torch.long).unsqueeze(1), ctx)


@contextlib.contextmanager
def _bypass_cpu_shim():
    """Decoding steps allocate nothing on a "cuda" device (the cache exists after the prefill, the patched
    `torch.cuda.current_device` already answers "cpu"), so the CPU runtime's per-op device rewriting
    (`cpu_runtime._CpuDeviceMode`) is bypassed for them: measured ~15% of a step on the tiny CPU model."""
    with torch._C.DisableTorchFunction():
        yield
