"""Method registry: hand-computed training signals for every method, NaN dropping, validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_camopd.algo.losses import pg_seq_loss, reduce_selected, topk_seq_loss
from megatron_camopd.algo.methods import METHODS, SignalBatch, build_method
from megatron_camopd.algo.weights import is_weights
from megatron_camopd.errors import DataError, SpecError

ON_POLICY = sorted(n for n, r in METHODS.items() if r.cls.on_policy)

NAN = float("nan")


def batch_from_delta(delta, mask=None, branch=None, **extra):
    """A batch whose rollout log-probs are -1 and teacher log-probs are -1 + delta."""
    delta = torch.as_tensor(delta, dtype=torch.float32)
    mask = torch.ones_like(delta) if mask is None else torch.as_tensor(mask)
    rollout = torch.full_like(delta, -1.0)
    branch = branch or ["general"] * delta.shape[0]
    return SignalBatch(mask=mask, teacher_lp=rollout + delta, rollout_lp=rollout, branch=branch, **extra)


def test_registry_names():
    assert set(METHODS) == {"opd", "mopd", "camopd", "uniopd", "relaxed_opd", "selectkd", "exopd", "sft"}
    assert {n for n, r in METHODS.items() if not r.cls.on_policy} == {"sft"}


def test_opd_clipped_gap_and_common_metrics():
    s = build_method("opd").prepare(batch_from_delta([[0.5, -7.0, 3.0]], mask=[[1, 1, 0]]))
    assert torch.allclose(s.advantages, torch.tensor([[0.5, -5.0, 0.0]]))
    assert s.token_weight.tolist() == [[1.0, 1.0, 0.0]] and s.sample_weight.tolist() == [1.0]
    assert s.metrics["mean_gap"] == pytest.approx(-3.25) and s.metrics["reverse_kl"] == pytest.approx(3.25)
    no_clip = build_method("opd", a_max=None).prepare(batch_from_delta([[-7.0]]))
    assert no_clip.advantages.tolist() == [[-7.0]]


def test_mopd_teacher_weight_scales_advantages():
    b = batch_from_delta(
        [[1.0, -1.0], [0.5, 0.5]], branch=["general", "domain"], teacher_weight=torch.tensor([2.0, 1.0])
    )
    s = build_method("mopd").prepare(b)
    assert torch.allclose(s.advantages, torch.tensor([[2.0, -2.0], [0.5, 0.5]]))
    assert s.metrics["mean_gap/general"] == 0.0 and s.metrics["mean_gap/domain"] == 0.5


def test_camopd_selection_and_scales_hand_case():
    # general scores |delta|: 3, 1, 0 -> total 4, target 3.2 -> keep {0, 1}
    # domain scores [delta]_+: 2, 0, 1 -> total 3, target 2.4 -> keep {3, 5}
    delta = [[-3.0], [1.0], [0.0], [2.0], [-5.0], [1.0]]
    b = batch_from_delta(delta, branch=["general"] * 3 + ["domain"] * 3)
    s = build_method("camopd").prepare(b)
    assert s.sample_weight.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert s.advantages.flatten().tolist() == [-6.0, 2.0, 0.0, 2.0, 0.0, 1.0]
    assert s.seq_scale.tolist() == [2.0, 2.0, 0.0, 1.0, 0.0, 1.0]
    assert s.metrics["selected_fraction/general"] == pytest.approx(2 / 3)
    assert s.metrics["selected_fraction/domain"] == pytest.approx(2 / 3)
    off = build_method("camopd", selection=False, r_g=1.0).prepare(b)
    assert off.sample_weight.tolist() == [1.0] * 6
    assert off.advantages.flatten().tolist() == [-3.0, 1.0, 0.0, 2.0, -5.0, 1.0]
    with pytest.raises(DataError, match="branch"):
        build_method("camopd").prepare(batch_from_delta([[1.0]], branch=["math"]))


def test_uniopd_spread_shift_and_balancing():
    # group 0: 1 correct (G=0), 1 incorrect (G=0) -> m = 0 < 0.4 -> spread +-0.2
    # group 1: 3 correct, 1 incorrect -> balancing keeps 1 correct
    delta = torch.zeros(6, 2)
    b = batch_from_delta(
        delta, reward=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0]), group=torch.tensor([0, 0, 1, 1, 1, 1])
    )
    s = build_method("uniopd").prepare(b)
    assert s.sample_weight[:2].tolist() == [1.0, 1.0]
    assert s.sample_weight[2:5].sum().item() == 1.0 and s.sample_weight[5].item() == 1.0
    assert torch.allclose(s.advantages[:2], torch.tensor([[0.2, 0.2], [-0.2, -0.2]]))
    assert s.metrics["balance_dropped"] == 2.0 and s.metrics["margin_after"] == pytest.approx(0.4)
    masked = build_method("uniopd", calibration="mask", online_balance=False).prepare(
        batch_from_delta([[0.0], [1.0], [0.5]], reward=torch.tensor([1.0, 1.0, 0.0]), group=torch.zeros(3).long())
    )
    assert masked.sample_weight.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(DataError, match="reward"):
        build_method("uniopd").prepare(batch_from_delta([[0.0]]))


def test_uniopd_balancing_resumes_from_state():
    b = batch_from_delta(torch.zeros(8, 1), reward=torch.tensor([1.0] * 6 + [0.0] * 2), group=torch.zeros(8).long())
    m1 = build_method("uniopd", seed=3)
    m1.prepare(b)
    state = m1.state_dict()
    expected = m1.prepare(b).sample_weight
    m2 = build_method("uniopd", seed=3)
    m2.load_state_dict(state)
    assert torch.equal(m2.prepare(b).sample_weight, expected)


def test_relaxed_opd_floor_and_entropy_mask():
    b = batch_from_delta([[-3.0, 0.5, 1.0, -0.2]], entropy=torch.tensor([[0.1, 0.2, 0.9, 0.8]]))
    s = build_method("relaxed_opd").prepare(b)
    assert torch.allclose(s.advantages, torch.tensor([[math.log(0.25), 0.5, 1.0, -0.2]]))
    assert s.token_weight.tolist() == [[0.0, 0.0, 1.0, 1.0]] and s.metrics["entropy_kept_fraction"] == 0.5


def test_selectkd_token_weights_and_acceptance():
    b = batch_from_delta(
        [[1.0, 1.0]],
        student_top1=torch.tensor([[4, 9]]),
        teacher_topk_ids=torch.tensor([[[1, 4, 0, 0, 0], [1, 2, 3, 5, 6]]]),
    )
    s = build_method("selectkd").prepare(b)
    assert torch.allclose(s.token_weight, torch.tensor([[1.0, 0.01]]))
    assert s.metrics["acceptance_rate"] == 0.5


def test_exopd_advantage():
    b = batch_from_delta([[1.0, -0.5]], ref_lp=torch.tensor([[-2.0, -1.0]]))
    s = build_method("exopd", lam=1.25).prepare(b)
    # teacher = [0, -1.5], student = [-1, -1]: 1.25*(2) - 1 = 1.5 ; 1.25*(-0.5) - 0 = -0.625
    assert torch.allclose(s.advantages, torch.tensor([[1.5, -0.625]]))
    plain = build_method("exopd", lam=1.0).prepare(b)
    assert torch.allclose(plain.advantages, torch.tensor([[1.0, -0.5]]))


@pytest.mark.parametrize("name", ON_POLICY)
def test_nan_on_response_token_drops_sample_never_propagates(name):
    teacher = torch.tensor([[-1.0, NAN], [-1.0, -2.0], [-0.5, NAN]])
    rollout = torch.tensor([[-1.5, -1.0], [-1.2, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])  # row 2's NaN is on padding: kept
    extra = {
        "entropy": torch.rand(3, 2),
        "student_top1": torch.zeros(3, 2).long(),
        "teacher_topk_ids": torch.zeros(3, 2, 5).long(),
        "ref_lp": rollout - 0.1,
        "reward": torch.tensor([1.0, 0.0, 1.0]),
        "group": torch.tensor([0, 0, 1]),
    }
    b = SignalBatch(mask, teacher, rollout, ["general", "general", "domain"], **extra)
    method = build_method(name, **({"selection": False} if name == "camopd" else {}))
    s = method.prepare(b)
    assert s.sample_weight.tolist() == [0.0, 1.0, 1.0]
    assert s.metrics["n_nan_dropped"] == 1.0
    assert torch.isfinite(s.advantages).all() and s.advantages[0].abs().sum() == 0
    assert all(not math.isnan(s.metrics[k]) for k in ("mean_gap", "reverse_kl"))
    train_lp = torch.tensor([[NAN, NAN], [-1.1, -0.9], [-1.0, NAN]], requires_grad=True)
    seq = pg_seq_loss(
        train_lp,
        s.advantages,
        b.mask,
        is_weights(train_lp, b.rollout_lp, b.mask, method.is_weight, method.eps_low, method.eps_high, method.is_cap),
        s.token_weight,
    )
    loss_sum, count = reduce_selected(seq, s.sample_weight)
    loss_sum.backward()
    assert torch.isfinite(loss_sum) and count.item() == 2 and torch.isfinite(train_lp.grad).all()


def test_topk_form_requires_teacher_topk_and_gives_seq_scale():
    m = build_method("camopd", loss="topk", selection=False)
    with pytest.raises(DataError, match="teacher_topk_lp"):
        m.prepare(batch_from_delta([[1.0]]))
    t_lp = torch.log(torch.tensor([[[0.5, 0.25]], [[0.5, 0.25]]]))
    b = batch_from_delta(
        [[1.0], [1.0]],
        branch=["general", "domain"],
        teacher_topk_lp=t_lp,
        teacher_topk_ids=torch.tensor([[[0, 1]], [[0, 1]]]),
    )
    s = m.prepare(b)
    seq = topk_seq_loss(t_lp.clone(), t_lp, b.mask) * s.seq_scale
    assert s.seq_scale.tolist() == [2.0, 1.0] and reduce_selected(seq, s.sample_weight)[1].item() == 2
    with pytest.raises(SpecError, match="loss"):
        build_method("exopd", loss="topk")


@pytest.mark.parametrize(
    "name,params,field",
    [
        ("camopd", {"rho_g": 0.0}, "rho_g"),
        ("camopd", {"r_d": -1.0}, "r_d"),
        ("opd", {"a_max": 0}, "a_max"),
        ("opd", {"is_weight": "clip"}, "is_weight"),
        ("uniopd", {"margin_mode": "median"}, "margin_mode"),
        ("uniopd", {"balance_ratio": 0.0}, "balance_ratio"),
        ("relaxed_opd", {"lam": 1.0}, "lam"),
        ("relaxed_opd", {"beta": 0.0}, "beta"),
        ("selectkd", {"k": 0}, "^k: must be > 0"),
        ("exopd", {"lam": 0.0}, "lam"),
        ("camopd", {"rho": 0.5}, "rho"),
        ("nope", {}, "method.name"),
    ],
)
def test_parameter_validation_names_the_field(name, params, field):
    with pytest.raises(SpecError, match=field):
        build_method(name, **params)


def test_signal_batch_shape_validation():
    with pytest.raises(DataError, match="rollout_lp"):
        SignalBatch(torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), ["general"] * 2)
    with pytest.raises(DataError, match="branch"):
        SignalBatch(torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), ["general"])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ON_POLICY), st.integers(0, 2**31 - 1))
def test_padding_values_never_change_signals(name, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 5
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    fields = {
        "teacher_lp": -torch.rand(b, t, generator=g) * 3,
        "rollout_lp": -torch.rand(b, t, generator=g) * 3,
        "entropy": torch.rand(b, t, generator=g),
        "ref_lp": -torch.rand(b, t, generator=g) * 3,
    }
    ids = {
        "student_top1": torch.randint(0, 6, (b, t), generator=g),
        "teacher_topk_ids": torch.randint(0, 6, (b, t, 5), generator=g),
    }
    common = {
        "branch": ["general", "domain"] * 3,
        "reward": (torch.rand(b, generator=g) < 0.5).float(),
        "group": torch.tensor([0, 0, 0, 1, 1, 1]),
    }
    out = []
    for noisy in (False, True):
        f = {k: torch.where(mask | (not noisy), v, torch.full_like(v, NAN)) for k, v in fields.items()}
        i = {
            k: torch.where((mask if v.dim() == 2 else mask.unsqueeze(-1)) | (not noisy), v, 99) for k, v in ids.items()
        }
        out.append(build_method(name, seed=1) if name == "uniopd" else build_method(name))
        out[-1] = out[-1].prepare(SignalBatch(mask=mask, **f, **i, **common))
    assert torch.equal(out[0].advantages, out[1].advantages)
    assert torch.equal(out[0].token_weight, out[1].token_weight)
    assert torch.equal(out[0].sample_weight, out[1].sample_weight)
    assert out[0].metrics.keys() == out[1].metrics.keys()


def _gap_batch(n: int = 40, seed: int = 0, nan_rows: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(n, 5, generator=g) * torch.linspace(0.1, 3.0, n).unsqueeze(1)  # unequal gaps
    for i in nan_rows:
        delta[i, 0] = NAN
    return batch_from_delta(delta, branch=["general"] * (n // 2) + ["domain"] * (n - n // 2))


def test_camopd_random_selection_keeps_as_many_as_the_gap_prefix_elsewhere():
    gap = build_method("camopd").prepare(_gap_batch())
    rnd_method = build_method("camopd", selection_order="random", seed=3)
    rnd = rnd_method.prepare(_gap_batch())
    for b, rows in (("general", slice(0, 20)), ("domain", slice(20, 40))):
        assert int((rnd.sample_weight[rows] > 0).sum()) == int((gap.sample_weight[rows] > 0).sum()), b
        assert rnd.metrics[f"selected_fraction/{b}"] == gap.metrics[f"selected_fraction/{b}"]
    assert not torch.equal(rnd.sample_weight > 0, gap.sample_weight > 0)  # same count, other samples
    # the kept samples carry the branch scale, the dropped ones nothing
    assert set(rnd.seq_scale[:20][rnd.sample_weight[:20] > 0].tolist()) == {2.0}
    # reproducible from (seed, batch counter); the counter is state a checkpoint restores
    again = build_method("camopd", selection_order="random", seed=3).prepare(_gap_batch())
    assert torch.equal(again.sample_weight, rnd.sample_weight)
    second = rnd_method.prepare(_gap_batch())
    assert rnd_method.state_dict() == {"calls": 2} and not torch.equal(second.sample_weight, rnd.sample_weight)
    resumed = build_method("camopd", selection_order="random", seed=3)
    resumed.load_state_dict({"calls": 1})
    assert torch.equal(resumed.prepare(_gap_batch()).sample_weight, second.sample_weight)
    assert build_method("camopd").state_dict() == {}


def test_camopd_random_selection_never_draws_a_dropped_nan_sample():
    nan_rows = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    for seed in range(20):
        s = build_method("camopd", selection_order="random", seed=seed).prepare(_gap_batch(nan_rows=nan_rows))
        assert not (s.sample_weight[list(nan_rows)] > 0).any(), seed


def test_camopd_selection_order_is_validated():
    with pytest.raises(SpecError, match="selection_order"):
        build_method("camopd", selection_order="length")
