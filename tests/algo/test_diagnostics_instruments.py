"""The instruments' maths on synthetic gradients whose answer is known: GCG against its size-matched random-subset
null, split-half reliability and the attenuation-corrected cross-branch cosine, the counteracted fraction, the
per-tensor breakdown, selection precision, and the diagnostics schedule that visits both branches."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_camopd.algo.camopd import BranchSchedule
from megatron_camopd.algo.diagnostics import (
    TENSOR_GROUPS,
    carries_conflict,
    coherence,
    coherence_report,
    corrected_cosine,
    cross_branch_stats,
    diagnostics_due,
    gcg_with_null,
    gram,
    grouped_cross_stats,
    random_subsets,
    selection_precision,
    spearman_brown,
    split_halves,
    subset_coherence,
    tensor_group,
)


def _noise(n: int, dim: int = 4000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_subset_coherence_from_gram_equals_direct_coherence():
    g = _noise(10) + 0.3
    k = gram(g)
    members = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert float(subset_coherence(k, members)) == pytest.approx(coherence(g[members]), rel=1e-9)
    assert float(subset_coherence(k, torch.ones(10, dtype=torch.bool))) == pytest.approx(coherence(g), rel=1e-9)
    assert math.isnan(float(subset_coherence(k, torch.zeros(10, dtype=torch.bool))))
    subsets = random_subsets(10, 4, 7, torch.Generator().manual_seed(1))
    assert subsets.shape == (7, 10) and subsets.sum(1).tolist() == [4] * 7


def test_pure_noise_null_is_the_shrinking_subset_effect():
    # 16 independent directions, keep 8: Coh ~ 1/sqrt(n), so any 8 are sqrt(2) more coherent than all 16 (+41%)
    k = gram(_noise(16, dim=20000))
    sel = torch.zeros(16, dtype=torch.bool)
    sel[:8] = True
    out = gcg_with_null(k, sel, draws=300, seed=3)
    assert out["gcg"] == pytest.approx(41.4, abs=4.0)
    assert out["gcg_null"] == pytest.approx(41.4, abs=3.0)  # GCG > 0 alone says nothing
    assert abs(out["gcg_excess"]) < 3 * out["gcg_null_sd"] + 1.0


def test_a_random_selection_reads_as_its_null_on_average():
    g = _noise(16, seed=5) + 0.05 * _noise(1, seed=6)  # weakly coherent batch (coherence ~0.3 at the sizes here)
    k = gram(g)
    gen = torch.Generator().manual_seed(7)
    excess = []
    for t in range(60):
        sel = random_subsets(16, 8, 1, gen)[0]
        excess.append(gcg_with_null(k, sel, draws=200, seed=t)["gcg_excess"])
    mean = sum(excess) / len(excess)
    sd = (sum((e - mean) ** 2 for e in excess) / (len(excess) - 1)) ** 0.5
    assert abs(mean) < 3 * sd / len(excess) ** 0.5 + 0.5


def test_selecting_the_coherent_samples_beats_the_null():
    signal = torch.ones(1, 4000, dtype=torch.float64)
    g = torch.cat([signal + 0.5 * _noise(8, seed=1), 3.0 * _noise(8, seed=2)])  # 8 aligned, 8 noise
    sel = torch.zeros(16, dtype=torch.bool)
    sel[:8] = True
    out = gcg_with_null(gram(g), sel, draws=400, seed=0)
    assert out["gcg"] > out["gcg_null"] + 3 * out["gcg_null_sd"]
    assert out["gcg_null_p"] < 0.01
    everything = gcg_with_null(gram(g), torch.ones(16, dtype=torch.bool))
    assert everything["gcg"] == 0.0 and everything["gcg_null"] == pytest.approx(0.0, abs=1e-9)


def test_coherence_report_labels_own_and_gap_selection():
    k = gram(_noise(6) + 0.2)
    all_kept = torch.ones(6, dtype=torch.bool)
    some = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    rep = coherence_report(k, all_kept, some, draws=50)
    assert "gcg" not in rep and "gap_gcg" in rep and "gap_gcg_null" in rep and rep["n_samples"] == 6
    rep = coherence_report(k, some, None, draws=50)
    assert {"gcg", "gcg_null", "gcg_excess", "coherence_selected"} <= set(rep) and "gap_gcg" not in rep


def _branch_batch(mean: torch.Tensor, n: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    return mean + sigma * torch.randn(n, mean.numel(), generator=gen, dtype=torch.float64)


def _halves_cos(x: torch.Tensor, gen: torch.Generator) -> float:
    a, b = split_halves(x.shape[0], gen)
    ga, gb = x[a].mean(0), x[b].mean(0)
    return float(ga @ gb / ga.norm() / gb.norm())


@pytest.mark.parametrize(("sign", "want"), [(-1.0, -1.0), (0.0, 0.0), (1.0, 1.0)])
def test_corrected_cosine_recovers_the_true_cosine_through_noise(sign, want):
    """Branches whose expected gradients have cosine `want`, seen through batches so noisy that the raw cosine is
    a small fraction of it: the attenuation correction (split-half reliabilities, Spearman-Brown) recovers it."""
    gen = torch.Generator().manual_seed(11)
    dim = 3000
    mu_g = torch.randn(dim, generator=gen, dtype=torch.float64)
    ortho = torch.randn(dim, generator=gen, dtype=torch.float64)
    ortho -= (ortho @ mu_g) / (mu_g @ mu_g) * mu_g
    mu_d = sign * mu_g if sign else ortho / ortho.norm() * mu_g.norm()
    cos, rel_g, rel_d = [], [], []
    for _ in range(40):
        xg, xd = _branch_batch(mu_g, 32, 8.0, gen), _branch_batch(0.7 * mu_d, 32, 8.0, gen)
        gg, gd = xg.mean(0), xd.mean(0)
        cos.append(float(gg @ gd / gg.norm() / gd.norm()))
        rel_g.append(spearman_brown(_halves_cos(xg, gen)))
        rel_d.append(spearman_brown(_halves_cos(xd, gen)))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    if sign:
        assert 0.1 < abs(mean(cos)) < 0.6 and mean(cos) * sign > 0  # attenuated, but right in sign
        assert sum(c * sign > 0 for c in cos) >= 36  # anti-aligned branches read negative through the noise
    assert corrected_cosine(mean(cos), mean(rel_g), mean(rel_d)) == pytest.approx(want, abs=0.15)


def test_reliability_and_correction_edge_cases():
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert spearman_brown(1.0) == 1.0 and spearman_brown(0.0) == 0.0
    assert math.isnan(spearman_brown(-1.0))
    assert corrected_cosine(-0.2, 0.25, 0.16) == pytest.approx(-1.0)
    assert math.isnan(corrected_cosine(-0.2, 0.0, 0.5)) and math.isnan(corrected_cosine(0.1, -0.1, 0.5))


def test_cross_branch_stats_known_vectors():
    g_g, g_d = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 0.5])
    out = cross_branch_stats(float(g_g @ g_d), float(g_g @ g_g), float(g_d @ g_d))
    assert out["grad_dot"] == -0.5
    assert out["grad_cos"] == pytest.approx(-(0.5**0.5))
    assert out["norm_ratio"] == pytest.approx(0.5**0.5)
    assert out["counteracted"] == pytest.approx(0.5)  # the mixed step g_g + g_d keeps half of g_g along g_g
    assert math.isnan(cross_branch_stats(0.0, 0.0, 1.0)["counteracted"])


def test_tensor_groups_and_breakdown():
    names = {
        "embedding.word_embeddings.weight": "embedding",
        "decoder.layers.0.self_attention.linear_qkv.weight": "attn_qkv",
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": "norm",
        "decoder.layers.0.self_attention.q_layernorm.weight": "attn_qk_norm",
        "decoder.layers.0.self_attention.linear_proj.weight": "attn_out",
        "decoder.layers.0.input_layernorm.weight": "norm",
        "decoder.layers.0.mlp.linear_fc1.weight": "mlp_in",
        "decoder.layers.0.mlp.linear_fc2.weight": "mlp_out",
        "decoder.final_layernorm.weight": "norm",
        "output_layer.weight": "output",
        "something.else": "other",
    }
    for name, group in names.items():
        assert tensor_group(name) == group and group in TENSOR_GROUPS
    out = grouped_cross_stats({"attn_qkv": (-3.0, 4.0, 9.0), "mlp_in": (1.0, 1.0, 4.0), "norm": (0.0, 0.0, 0.0)})
    assert out["attn_qkv/cos"] == pytest.approx(-0.5) and out["mlp_in/cos"] == pytest.approx(0.5)
    assert out["attn_qkv/dot_share"] == pytest.approx(1.5) and out["mlp_in/dot_share"] == pytest.approx(-0.5)
    assert "norm/cos" not in out  # no gradient in that role


def test_selection_precision_against_the_known_conflict():
    sel = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    conflict = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    out = selection_precision(sel, conflict)
    assert out["precision"] == pytest.approx(2 / 3) and out["base_rate"] == 3 / 8
    assert out["recall"] == pytest.approx(2 / 3) and out["lift"] == pytest.approx((2 / 3) / (3 / 8))
    none = selection_precision(sel, torch.zeros(8, dtype=torch.bool))
    assert none["precision"] == 0.0 and math.isnan(none["recall"]) and math.isnan(none["lift"])


def test_conflict_label_by_tokens():
    signoff = frozenset({94})
    assert carries_conflict([5, 6, 94, 3], "general", signoff)  # a general rollout that signs off
    assert not carries_conflict([5, 6, 3], "general", signoff)
    assert carries_conflict([5, 6, 3], "domain", signoff)  # a domain rollout that forgot the sign-off
    assert not carries_conflict([5, 94, 3], "domain", signoff)


def test_diagnostics_visit_both_branches_and_skip_step_zero():
    alt = BranchSchedule("alternate", n_g=3)  # G,G,G,D: a global interval of 20 would only ever hit G
    due = [t for t in range(80) if diagnostics_due(t, alt.at, alt.period, 5, None, 1)]
    assert 0 not in due
    branches = [alt.at(t) for t in due]
    assert "domain" in branches and "general" in branches
    gen = [t for t in due if alt.at(t) == "general"]
    gen_steps = [t for t in range(1, 80) if alt.at(t) == "general"]
    assert gen == gen_steps[::5]  # every 5th general step, counted per branch
    dom = [t for t in range(1, 80) if alt.at(t) == "domain"]
    assert [t for t in due if alt.at(t) == "domain"] == dom[::5]
    per_branch = [t for t in range(80) if diagnostics_due(t, alt.at, alt.period, 5, 2, 1) and alt.at(t) == "domain"]
    assert per_branch == dom[::2]  # the domain's own interval
    mixed = BranchSchedule("mixed")
    assert [t for t in range(12) if diagnostics_due(t, mixed.at, mixed.period, 4, None, 1)] == [1, 5, 9]
    assert [t for t in range(4) if diagnostics_due(t, mixed.at, mixed.period, 1, None, 0)] == [0, 1, 2, 3]
