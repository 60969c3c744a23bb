"""CaMOPD: branch schedule, gap scores, mass-target selection and branch scales."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_camopd.algo.camopd import BranchSchedule, branch_scale, gap_scores, mass_target_select
from megatron_camopd.errors import CheckpointError, SpecError

SETTINGS = settings(max_examples=80, deadline=None)


def test_alternate_schedule_default_sequence():
    s = BranchSchedule()
    seq = [s.next() for _ in range(8)]
    assert seq == ["general"] * 3 + ["domain"] + ["general"] * 3 + ["domain"]


@SETTINGS
@given(st.integers(0, 5), st.integers(0, 3), st.integers(0, 40), st.integers(1, 30))
def test_schedule_periodic_and_resumes_exactly(n_g, n_d, split, more):
    if n_g + n_d == 0:
        return
    ref = BranchSchedule("alternate", n_g=n_g, n_d=n_d)
    full = [ref.next() for _ in range(split + more)]
    for t in range(len(full) - ref.period):
        assert full[t] == full[t + ref.period]
    if len(full) >= ref.period:
        assert full[: ref.period].count("general") == n_g
    first = BranchSchedule("alternate", n_g=n_g, n_d=n_d)
    head = [first.next() for _ in range(split)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BranchSchedule("alternate", n_g=n_g, n_d=n_d)
    resumed.load_state_dict(state)
    assert resumed.peek() == full[split]
    assert head + [resumed.next() for _ in range(more)] == full


def test_mixed_schedule_and_split():
    s = BranchSchedule("mixed", ratio=(3, 1))
    assert [s.next() for _ in range(3)] == ["mixed"] * 3
    assert s.split(512) == (384, 128)
    assert BranchSchedule("mixed", ratio=(1, 1)).split(7) in {(4, 3), (3, 4)}
    assert sum(s.split(5)) == 5


def test_schedule_rejects_mismatched_checkpoint_and_bad_config():
    s = BranchSchedule(n_g=3)
    with pytest.raises(CheckpointError, match="n_g"):
        s.load_state_dict({**s.state_dict(), "n_g": 2})
    with pytest.raises(SpecError, match="n_g"):
        BranchSchedule(n_g=-1)
    with pytest.raises(SpecError, match="mode"):
        BranchSchedule("random")
    with pytest.raises(SpecError, match="ratio"):
        BranchSchedule("mixed", ratio=(0, 0))


def test_gap_scores_hand_case():
    delta = torch.tensor([[1.0, -3.0, 5.0], [-2.0, 4.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert gap_scores(delta, mask, "general").tolist() == pytest.approx([2.0, 2.0])
    assert gap_scores(delta, mask, "domain").tolist() == pytest.approx([0.5, 4.0 / 3])
    assert gap_scores(delta, mask, ["domain", "general"]).tolist() == pytest.approx([0.5, 2.0])
    with pytest.raises(ValueError):
        gap_scores(delta, mask, "math")


@SETTINGS
@given(
    st.lists(
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]) | st.floats(0, 10, allow_subnormal=False), min_size=1, max_size=20
    ),
    st.floats(0.01, 1.0),
)
def test_selection_is_smallest_prefix_reaching_mass(scores, rho):
    s = torch.tensor(scores, dtype=torch.float64)
    res = mass_target_select(s, rho)
    assert res.n_nan == 0
    sorted_vals = s[res.order]
    assert torch.all(sorted_vals[:-1] >= sorted_vals[1:])
    for i in range(len(res.order) - 1):  # stable: equal scores keep their input order
        if sorted_vals[i] == sorted_vals[i + 1]:
            assert res.order[i] < res.order[i + 1]
    assert res.keep.sum().item() == res.k
    assert set(torch.nonzero(res.keep).flatten().tolist()) == set(res.order[: res.k].tolist())
    total = math.fsum(scores)
    if total == 0:
        assert res.all_zero and res.k == len(scores)
        return
    kept_mass = math.fsum(sorted_vals[: res.k].tolist())
    prev_mass = math.fsum(sorted_vals[: res.k - 1].tolist())
    assert kept_mass >= rho * total * (1 - 1e-9)
    assert prev_mass < rho * total * (1 + 1e-9)


def test_selection_hand_cases_and_edge_cases():
    res = mass_target_select(torch.tensor([1.0, 3.0, 0.0, 2.0]), 0.8)  # 3+2 = 5 >= 4.8
    assert res.keep.tolist() == [False, True, False, True] and res.k == 2
    assert mass_target_select(torch.tensor([1.0, 3.0, 0.0, 2.0]), 1.0).keep.tolist() == [True, True, False, True]
    zero = mass_target_select(torch.zeros(3), 0.8)
    assert zero.all_zero and zero.keep.all() and zero.k == 3
    one = mass_target_select(torch.tensor([0.7]), 0.1)
    assert one.keep.tolist() == [True] and one.k == 1
    ties = mass_target_select(torch.ones(4), 0.5)
    assert ties.keep.tolist() == [True, True, False, False]
    nan = mass_target_select(torch.tensor([float("nan"), 1.0, float("inf"), 0.5]), 0.6)
    assert nan.n_nan == 2 and nan.keep.tolist() == [False, True, False, False]
    empty = mass_target_select(torch.tensor([float("nan")]), 0.8)
    assert empty.k == 0 and not empty.keep.any() and not empty.all_zero
    with pytest.raises(SpecError, match="rho"):
        mass_target_select(torch.ones(2), 0.0)
    with pytest.raises(ValueError):
        mass_target_select(torch.tensor([-1.0, 2.0]), 0.5)


def test_branch_scale_defaults():
    assert branch_scale("general") == 2.0 and branch_scale("domain") == 1.0
    assert branch_scale("general", r_g=3.0) == 3.0
