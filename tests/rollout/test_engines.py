"""The rollout engines sample the same tokens: the KV-cached `megatron` engine against the full-recompute
`reference` oracle, at TP=1 and on two gloo ranks at TP=2 and PP=2, with stops that finish rows at different
steps (compaction), prompts of different lengths (prompt tails fed through decoding), a KV budget that splits
the batch, FP8-style row padding, and the grouping rule itself."""

from __future__ import annotations

import pytest
import torch

from megatron_camopd.backend.spawn import run_on_ranks
from megatron_camopd.rollout.kv_engine import MegatronSampler, kv_bytes_per_token, plan_groups
from megatron_camopd.rollout.sampler import build_sampler

from ._workers import as_data, generate_all, in_process_model, layout_worker, make_model, params_list, prompts_and_seeds


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def model(hf_dir):
    from megatron_camopd.backend.cpu_runtime import init_distributed

    init_distributed(1, 1)
    return in_process_model(hf_dir)


@pytest.fixture(scope="module")
def reference(model):
    return generate_all(model, "reference")


def assert_same(got, want, lp_atol=1e-4):
    """Same tokens, top-1 and finish reasons; log-probs and entropies equal up to float rounding."""
    assert len(got) == len(want)
    for (ids, lp, ent, top1, why), (ids0, lp0, ent0, top10, why0) in zip(got, want):
        assert ids == ids0 and why == why0 and torch.equal(top1, top10)
        torch.testing.assert_close(lp, lp0, atol=lp_atol, rtol=0)
        torch.testing.assert_close(ent, ent0, atol=lp_atol, rtol=0)


def test_reference_rollouts_are_varied(reference):
    """The fixture really exercises early stops, full lengths and the context limit."""
    reasons = {r[4] for per_params in reference for r in per_params}
    lengths = {len(r[0]) for r in reference[1]}
    assert {"stop", "length"} <= reasons and len(lengths) >= 4


def test_megatron_engine_equals_reference(model, reference):
    for got, want in zip(generate_all(model, "megatron"), reference):
        assert_same(got, want)


def test_kv_budget_split_and_fp8_row_padding_keep_tokens(model, reference):
    """A budget of ~3 rows splits the batch into groups; padding every forward to 16 rows changes nothing."""
    per_row = kv_bytes_per_token([c for c in model.chunks]) * (24 + 30)
    tight = build_sampler("megatron", model, kv_cache_gb=3 * per_row / 2**30)
    prompts, seeds = prompts_and_seeds()
    groups = plan_groups([len(p) for p in prompts], 30, kv_bytes_per_token(model.chunks), tight.kv_budget)
    assert len(groups) >= 3 and max(len(g) for g in groups) <= 3
    padded = MegatronSampler(model)
    padded.row_multiple = 16
    widths = []
    forward = padded._forward
    padded._forward = lambda tokens, ctx: widths.append(tokens.shape[0]) or forward(tokens, ctx)
    for sampler in (tight, padded):
        for p, want in zip(params_list(), reference):
            assert_same(as_data(sampler.generate(prompts, p, seeds)), want)
    assert widths and all(w % 16 == 0 for w in widths)


def test_plan_groups_budget_and_prompt_spread():
    assert plan_groups([5, 3, 9, 4], 10, 1, 1e9) == [[1, 3, 0, 2]]  # sorted by length, one group
    assert plan_groups([5, 5, 5, 5], 10, 1, 2 * 15) == [[0, 1], [2, 3]]  # 2 rows x 15 tokens fit
    assert plan_groups([8, 300, 10], 16, 1, 1e9) == [[0, 2], [1]]  # a 292-token tail > max(64, 16 // 4)
    assert plan_groups([8], 10, 10**9, 1.0) == [[0]]  # a row that alone exceeds the budget still runs
    assert plan_groups([5, 5], 10, 1, 1e9, max_context=12) == [[0, 1]]


def test_kv_budget_holds_after_fp8_row_padding():
    """FP8 pads every forward to 16 rows and the filler rows hold cache too: 20 rows of 15 tokens fit a 300-token
    budget unpadded (one group), but padded they are 32 rows; the groups are 16 + 4 rows (each padded to 16)."""
    budget, tokens = 20 * 15, 15
    assert plan_groups([5] * 20, 10, 1, budget) == [list(range(20))]
    groups = plan_groups([5] * 20, 10, 1, budget, row_multiple=16)
    assert groups == [list(range(16)), list(range(16, 20))]
    assert all(-(-len(g) // 16) * 16 * tokens <= budget for g in groups)


def test_a_budget_without_room_for_one_padded_row_is_refused(model):
    """Checked when the engine is built, naming the field: one row of the full context, padded to 16 rows under
    FP8 (the flagship at TP2/PP2: 16 x 36,864 tokens x 36 KiB = 20.3 GiB, over its 16 GiB)."""
    from megatron_camopd.errors import SpecError

    row = kv_bytes_per_token(model.chunks) * model.max_context
    assert MegatronSampler(model, kv_cache_gb=row / 2**30).row_multiple == 1
    with pytest.raises(SpecError, match="rollout.kv_cache_gb"):
        MegatronSampler(model, kv_cache_gb=0.5 * row / 2**30)
    config = model.chunks[0].config
    config.fp8 = "hybrid"  # only the row multiple reads it here (no forward runs)
    try:
        with pytest.raises(SpecError, match=r"rollout.kv_cache_gb: .* padded to 16 rows \(FP8\)"):
            MegatronSampler(model, kv_cache_gb=8 * row / 2**30)
        assert MegatronSampler(model, kv_cache_gb=16 * row / 2**30).row_multiple == 16
    finally:
        config.fp8 = None


def test_greedy_megatron_equals_transformers(hf_dir, model):
    from transformers import AutoModelForCausalLM

    from megatron_camopd.rollout.sampling import SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts, _ = prompts_and_seeds()
    got = build_sampler("megatron", model).generate(
        prompts, SamplingParams(greedy=True, max_new_tokens=20), [0] * len(prompts)
    )
    for p, r in zip(prompts, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert r.response_ids == want[0, len(p) :].tolist()


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_megatron_engine_tp2_pp2_equal_tp1_reference(hf_dir, reference, tp, pp):
    results = run_on_ranks(layout_worker, 2, hf_dir, tp, pp)
    for rank_result in results:  # every rank of the model-parallel group holds the same rollouts
        for got, want in zip(rank_result, reference):
            assert_same(got, want)
