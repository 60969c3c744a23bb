"""Supervised fine-tuning batches: response-only cross-entropy on chat data with the same Megatron backend.

The papers build domain teachers this way. A row's reference answer (its `answer`/`reference` field, or the last
assistant turn) becomes the response: prompt tokens carry no loss, response tokens and the closing end-of-turn
token do. Each sequence is token-averaged, then sequences are averaged (as the distillation losses are).
"""

from __future__ import annotations

import time

import torch

from megatron_camopd.errors import DataError
from megatron_camopd.rollout.assemble import StepBatch
from megatron_camopd.rollout.collect import Collector, Sample, largest_remainder
from megatron_camopd.rollout.sampling import Rollout


def _draw(c: Collector, n: int):
    streams = [x for group in c.streams.values() for x in group]
    out = []
    for (_, stream), k in zip(streams, largest_remainder(n, [cfg.weight for cfg, _ in streams])):
        out.extend(stream.next_batch(k))
    return out


def sft_batch(c: Collector, step: int, seq_length: int, micro_batch_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """This DP rank's SFT micro-batch tensors for `step` (`rollout.prompts_per_step` rows, each cut to
    `seq_length` tokens) and the number of loss tokens in the whole batch."""
    tok = c.tokenizer
    prompts = _draw(c, c.rollout.prompts_per_step)
    samples = []
    for i, p in enumerate(prompts):
        if p.reference is None or not isinstance(p.reference, (str, int, float)):
            raise DataError(f"{p.source}: SFT needs a text reference answer (field 'answer' or 'reference')")
        resp = tok.encode_text(str(p.reference)) + [tok.eos_id]  # a reference cannot forge a turn end
        room = seq_length - len(p.prompt_ids)
        resp = resp[: max(room, 1)]
        zeros = torch.zeros(len(resp))
        r = Rollout(p.prompt_ids, resp, zeros, zeros, zeros.long(), "stop")
        samples.append(Sample(index=i, group=i, branch="all", prompt=p, teacher="", verifier=None, rollout=r))
    batch = StepBatch.of(samples, None, None, c.dp_rank, c.dp_size).megatron(tok.pad_id, micro_batch_size)
    return batch, sum(len(s.rollout.response_ids) for s in samples if s.rollout is not None)


def sft_step(session, step: int, loss_spec) -> dict:
    """One SFT step of `session` (`method.name: sft`): the batch above through the same Megatron train step;
    returns its metrics row."""
    t0 = time.time()
    spec = session.spec
    batch, n_tokens = sft_batch(session.collector, step, spec.seq_length, spec.train.micro_batch_size)
    out = session.engine.train_step(batch, loss_spec)
    dt = time.time() - t0
    return {"step": step + 1, "branch": "sft", **out, "tokens_per_s": n_tokens / max(dt, 1e-9)}
