"""Functions run on spawned gloo ranks by the training tests (module level so spawn can import them)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import REPO

TINY_SPEC = REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml"


def tiny_overrides(root: Path, ckpt: Path, *extra: str) -> list[str]:
    """Point the tiny example spec at a tiny setup made under `root` and a checkpoint dir."""
    from megatron_camopd.demo.tiny import tiny_spec_overrides

    return [
        *tiny_spec_overrides(root),
        f"checkpoint.dir={ckpt}",
        "logging.progress=off",
        "logging.diagnostics=false",
        "rollout.max_new_tokens=12",
        *extra,
    ]


def run_train(rank: int, world: int, overrides: list[str]) -> list[dict] | None:
    """Train the tiny spec on this rank; rank 0 returns the metrics rows."""
    from megatron_camopd.config import load_spec
    from megatron_camopd.loop.metrics import read_metrics
    from megatron_camopd.loop.train import train

    spec = load_spec(TINY_SPEC, overrides)
    train(spec)
    if rank == 0:
        return read_metrics(Path(spec.checkpoint.dir) / "metrics.jsonl")
    return None


def run_many(rank: int, world: int, runs: list[list[str]]) -> list:
    """Several trainings one after another in the same process (world size 1)."""
    return [run_train(rank, world, o) for o in runs]


def loss_vs_formula(rank: int, world: int, overrides: list[str], mbs_list: list[int]) -> list[tuple[float, float]]:
    """(Megatron step loss, the spec's formula on full-vocab log-probs) for one rollout batch, per micro-batch size."""
    import torch

    from megatron_camopd.algo.losses import pg_seq_loss, topk_seq_loss
    from megatron_camopd.algo.weights import is_weights
    from megatron_camopd.config import load_spec
    from megatron_camopd.loop.session import open_session
    from megatron_camopd.loop.train import _loss_spec
    from megatron_camopd.rollout.assemble import add_topk, signal_batch, train_batch
    from megatron_camopd.rollout.collect import collect_step

    spec = load_spec(TINY_SPEC, overrides)
    session = open_session(spec)
    samples = collect_step(session.collector, 0, session.schedule.next())
    sig = signal_batch(samples, {})
    signals = session.method.prepare(sig)
    rows = list(range(len(samples)))
    width = max(len(s.rollout.ids) for s in samples)
    loss_spec = _loss_spec(spec)
    out = []
    for mbs in mbs_list:
        session.engine.micro_batch_size = mbs
        batch = train_batch(samples, signals, rows, session.tokenizer.pad_id, mbs, width)
        if loss_spec.loss == "topk":
            add_topk(batch, samples, rows, sig)
        stats = session.engine.accumulate_grads(batch, loss_spec)
        model = session.engine.models()[0]
        with torch.no_grad():
            pos = torch.arange(width).unsqueeze(0).expand(batch["tokens"].shape[0], width)
            logits = model(batch["tokens"], pos, None)[..., : session.arch.vocab_size].float()
            logp = torch.log_softmax(logits, -1)
        mask = batch["loss_mask"]
        if loss_spec.loss == "topk":
            seq = topk_seq_loss(logp.gather(-1, batch["topk_ids"]), batch["topk_lp"], mask) * batch["seq_scale"]
        else:
            lp = logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
            w = is_weights(lp, batch["rollout_lp"], mask, mode=spec.method.is_weight)
            seq = pg_seq_loss(lp, batch["advantages"], mask, is_w=w, token_weight=batch["token_weight"])
        sw = batch["sample_weight"]
        ref = float((seq * sw).sum() / sw.sum())
        out.append((stats["loss_sum"] / stats["count"], ref))
    session.close()
    return out


def run_methods(rank: int, world: int, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Each named run (overrides) in sequence; returns its metrics rows."""
    return {name: run_train(rank, world, o) for name, o in runs.items()}


def sft_batch_check(rank: int, world: int, overrides: list[str]) -> list[tuple[list[int], list[int], str]]:
    """(tokens under the loss mask, label ids there, the reference) for the first SFT rows."""
    from megatron_camopd.config import load_spec
    from megatron_camopd.loop.session import open_session
    from megatron_camopd.loop.sft import sft_batch

    spec = load_spec(TINY_SPEC, overrides)
    session = open_session(spec)
    batch, _ = sft_batch(session.collector, 0, spec.seq_length, spec.train.micro_batch_size)
    out = []
    for r in range(2):
        m = batch["loss_mask"][r] > 0
        out.append(
            (
                batch["labels"][r][m].tolist(),
                session.tokenizer.eos_id,
                session.tokenizer.decode(batch["labels"][r][m].tolist()[:-1]),
            )
        )
    session.close()
    return out


def megatron_logits(rank: int, world: int, ckpt: str, ids: list[int]):
    """Logits [1, S, V] of a checkpoint written by `camopd train`, loaded at TP=1 (vocab padding dropped)."""
    import torch

    from megatron_camopd.backend.checkpoint import find_model_meta, load_model_only, resolve_checkpoint
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.backend.engine import build_chunks
    from megatron_camopd.backend.model import ModelArch

    init_distributed(1, 1)
    arch = ModelArch.from_hf_dir(find_model_meta(ckpt))
    chunks, _ = build_chunks(arch, 1, 1, None)
    load_model_only(resolve_checkpoint(ckpt), chunks)
    t = torch.tensor([ids])
    with torch.no_grad():
        return chunks[0](t, torch.arange(len(ids)).unsqueeze(0), None)[..., : arch.vocab_size].float()


def count_passes(rank: int, world: int, overrides: list[str]) -> dict:
    """Train the tiny spec counting this rank's grad-enabled student forwards and the backwards through them,
    separately for the training passes and the gradient diagnostics (the passes FP8's amax all-reduce joins)."""
    import torch

    import megatron_camopd.loop.steprow as steprow
    from megatron_camopd.backend import forward

    counts = {"train": [0, 0], "diag": [0, 0]}
    phase = ["train"]
    plain_forward, plain_diag = forward._model_forward, steprow.diagnostics_row

    def counted_forward(model, tokens):
        out = plain_forward(model, tokens)
        if torch.is_grad_enabled():
            c = counts[phase[0]]
            c[0] += 1
            if out.requires_grad:
                out.register_hook(lambda g, c=c: c.__setitem__(1, c[1] + 1))
        return out

    def counted_diag(*args, **kwargs):
        phase[0] = "diag"
        try:
            return plain_diag(*args, **kwargs)
        finally:
            phase[0] = "train"

    forward._model_forward, steprow.diagnostics_row = counted_forward, counted_diag
    try:
        rows = run_train(rank, world, overrides)
    finally:
        forward._model_forward, steprow.diagnostics_row = plain_forward, plain_diag
    return {"counts": counts, "rows": rows}
