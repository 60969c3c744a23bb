"""The DP exchange's stand-in top-k rows give the batch-level methods the same validity and SelecTKD acceptance
as the real rows, while carrying none of their values over the wire."""

from __future__ import annotations

import pickle

import torch

from megatron_camopd.algo.methods import build_method
from megatron_camopd.data.prompts import Prompt
from megatron_camopd.rollout.assemble import signal_batch
from megatron_camopd.rollout.collect import Sample
from megatron_camopd.rollout.dp_exchange import summarize, with_standin_topk, without_topk
from megatron_camopd.rollout.sampling import Rollout
from megatron_camopd.teachers.base import TeacherScores

K = 8


def _samples(n_samples: int = 6) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_samples):
        n = 5 + i
        top1 = torch.randint(0, 6, (n,), generator=g)
        ids = torch.randint(0, 6, (n, K), generator=g)
        lps = -torch.rand(n, K, generator=g)
        if i == 3:
            lps[2, 5] = float("nan")  # dropped by a method that checks the top-k log-probs
        prompt = Prompt(uid=str(i), domain="general", prompt_ids=[1, 2, 3], messages=[], reference=None, source="t")
        r = Rollout([1, 2, 3], list(range(n)), -torch.rand(n, generator=g), torch.rand(n, generator=g), top1)
        s = Sample(
            index=i,
            group=i,
            branch="general",
            prompt=prompt,
            teacher="general",
            verifier=None,
            rollout=r,
            scores=TeacherScores(-torch.rand(n, generator=g), ids, lps),
        )
        out.append(s)
    return out


def test_standins_reproduce_selection_and_acceptance() -> None:
    real = _samples()
    stand = [with_standin_topk(without_topk(s), summarize(s, accept_k=5)) for s in real]
    for method, kept in ((build_method("selectkd", k=5), 6), (build_method("opd", loss="topk"), 5)):
        a = method.prepare(signal_batch(real, {"general": 1.0}))
        b = method.prepare(signal_batch(stand, {"general": 1.0}))
        assert torch.equal(a.sample_weight, b.sample_weight)
        assert a.sample_weight.sum() == kept  # the top-k loss drops the sample with a NaN top-k log-prob
        assert a.metrics.get("acceptance_rate") == b.metrics.get("acceptance_rate")
    assert 0 < build_method("selectkd", k=5).prepare(signal_batch(real, {})).metrics["acceptance_rate"] < 1


def test_exchanged_sample_carries_no_topk() -> None:
    s = _samples(1)[0]
    light = without_topk(s)
    assert light.scores.topk_ids is None and s.scores.topk_ids is not None  # the original is untouched
    assert len(pickle.dumps(light)) < len(pickle.dumps(s)) - s.scores.topk_ids.numel() * 8
