"""Uni-OPD offline difficulty-aware balancing: before training, measure each prompt's pass count with the student
and upsample by difficulty; the balanced prompt set and its histograms are written to disk.

For every stream with a verifier: roll out `offline_n` samples per prompt with the student (the same seeded
sampler as training), verify them, histogram the pass counts, and repeat prompts by the configured rule
(`u`: intermediate pass counts; `mirrored_j`: every prompt not always solved; `auto`: `u` when both ends of the
histogram hold at least 20% of the prompts, else `mirrored_j`). Output, under `<checkpoint.dir>/offline_balance/`:
`<stream>.jsonl` (messages-format rows, repeated) and `<stream>.hist.json` (histograms before/after, rule).
The stream then trains on the balanced file. The pass is done once: on resume the written file is reused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch.distributed as dist

from megatron_camopd.algo.uniopd import OfflineBalance, UniOPDParams, offline_difficulty_balance
from megatron_camopd.config.sections import DataConfig
from megatron_camopd.data.prompts import PromptSource, PromptStream
from megatron_camopd.data.verifiers import VERIFIER_NAMES, get_verifier
from megatron_camopd.rollout.collect import Collector
from megatron_camopd.rollout.sampling import sample_seed

log = logging.getLogger("megatron_camopd")


def choose_shape(hist: list[int], shape: str) -> str:
    if shape != "auto":
        return shape
    total = max(sum(hist), 1)
    return "u" if hist[0] >= 0.2 * total and hist[-1] >= 0.2 * total else "mirrored_j"


def balance_plan(counts: list[int], uniopd) -> tuple[str, OfflineBalance]:
    """(shape, OfflineBalance) for the pass counts of one stream under `method.uniopd`: the histogram's shape
    (`offline_shape`, or chosen by `choose_shape`) and the prompts repeated within its bounds (`offline_low`/
    `offline_high`; unset, the shape's own: [1, N-1] for u, [0, N-1] for mirrored_j)."""
    u = uniopd
    hist = [counts.count(c) for c in range(u.offline_n + 1)]
    shape = choose_shape(hist, u.offline_shape)
    return shape, offline_difficulty_balance(
        counts, u.offline_n, shape, u.offline_low, u.offline_high, u.offline_factor
    )


def pass_counts(c: Collector, prompts, verifier: str, n: int, batch: int = 256) -> list[int]:
    """Pass counts of `n` student samples per prompt (seeded like training rollouts; step index -1)."""
    tok = c.tokenizer
    check = get_verifier(VERIFIER_NAMES[verifier])
    items = [(i, j) for i in range(len(prompts)) for j in range(n)]
    counts = [0] * len(prompts)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        outs = c.sampler.generate(
            [prompts[i].prompt_ids for i, _ in chunk],
            c.params,
            [sample_seed(c.seed, -1, i * n + j) for i, j in chunk],
        )
        for (i, _), out in zip(chunk, outs):
            counts[i] += int(check(tok.decode(out.response_ids, skip_special_tokens=True), prompts[i].reference))
    return counts


def balance_streams(c: Collector, uniopd: UniOPDParams, data: DataConfig, checkpoint_dir: str | Path) -> None:
    """Replace each verifiable stream of `c.streams` by its difficulty-balanced version under `method.uniopd`
    (streams re-read with the `data` section's prompt settings; files under `checkpoint.dir`); collective."""
    u = uniopd
    out_dir = Path(checkpoint_dir) / "offline_balance"
    for streams in c.streams.values():
        for k, (cfg, stream) in enumerate(streams):
            if cfg.verifier == "none":
                continue
            path, hist_path = out_dir / f"{cfg.name}.jsonl", out_dir / f"{cfg.name}.hist.json"
            if not hist_path.exists():
                prompts = stream.prompts
                counts = pass_counts(c, prompts, cfg.verifier, u.offline_n)
                shape, res = balance_plan(counts, u)
                if dist.get_rank() == 0:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    with open(tmp, "w") as f:
                        for i in res.indices:
                            p = prompts[i]
                            f.write(
                                json.dumps(
                                    {"uid": p.uid, "domain": p.domain, "messages": p.messages, "answer": p.reference}
                                )
                                + "\n"
                            )
                    os.replace(tmp, path)
                    hist_path.write_text(
                        json.dumps(
                            {
                                "shape": shape,
                                "n_rollouts": u.offline_n,
                                "hist_before": res.hist_before,
                                "hist_after": res.hist_after,
                                "prompts_before": len(prompts),
                                "prompts_after": len(res.indices),
                            },
                            indent=1,
                        )
                    )
                dist.barrier()
                log.info("offline balance %s: %s -> %s (%s)", cfg.name, res.hist_before, res.hist_after, shape)
            balanced = PromptStream(
                [PromptSource(str(path), format="messages", domain=cfg.domain)],
                c.tokenizer,
                max_prompt_len=data.max_prompt_tokens,
                overlong=data.overlong,
                seed=stream.seed,
                shuffle=data.shuffle,
                name=cfg.name,
            )
            streams[k] = (cfg, balanced)
