"""Checkpoints at scale (issue 29, defect 9) at DP=2 over gloo: `checkpoint.fully_parallel` spreads the writes over
the DP ranks and a run resumed from such a checkpoint (loaded fully parallel or plainly) follows the uninterrupted
plain-save run's loss curve bit for bit; `checkpoint.optimizer_format` is recorded in the checkpoint, and a
dp_reshardable distributed-optimizer checkpoint refuses a TP change by naming the field before any model loads.
(The distributed optimizer's state cannot be loaded on CPU without TE/Apex: its save and the refusal are what
shows here; tools/gpu_check.sh loads it.)"""

from __future__ import annotations

import json

import pytest

from megatron_camopd.backend.checkpoint import latest_checkpoint
from megatron_camopd.backend.spawn import run_on_ranks
from megatron_camopd.errors import CheckpointError

from ._workers import run_many, run_train, tiny_overrides


def _curve(rows):
    return [(r["step"], r["branch"], r["loss"], r["grad_norm"]) for r in rows]


def _rank_bytes(ckpt) -> dict[int, int]:
    """Bytes of the torch_dist data files (`__<rank>_<n>.distcp`) each global rank wrote."""
    out: dict[int, int] = {}
    for f in ckpt.glob("*.distcp"):
        rank = int(f.name.strip("_").split("_")[0])
        out[rank] = out.get(rank, 0) + f.stat().st_size
    return out


@pytest.mark.multiproc
def test_fully_parallel_save_resumes_bitwise_dp2(tiny_root, tmp_path):
    def run(name: str, steps: int, fully_parallel: bool) -> list[str]:
        return tiny_overrides(
            tiny_root,
            tmp_path / name,
            f"train.steps={steps}",
            "checkpoint.save_interval=2",
            f"checkpoint.fully_parallel={str(fully_parallel).lower()}",
        )

    runs = [
        run("plain", 4, False),  # the uninterrupted reference, plain save
        run("fp", 2, True),  # saved fully parallel at step 2 ...
        run("fp", 4, True),  # ... resumed with a fully parallel load
        run("fp_plain", 2, True),
        run("fp_plain", 4, False),  # ... resumed with a plain load
    ]
    ref, _, fp, _, fp_plain = run_on_ranks(run_many, 2, runs)[0]
    assert len(ref) == 4
    assert _curve(fp) == _curve(ref)  # exact float equality
    assert _curve(fp_plain) == _curve(ref)
    plain = _rank_bytes(tmp_path / "plain" / "iter_0000002")
    after = _rank_bytes(latest_checkpoint(tmp_path / "fp_plain"))  # iter_4: saved plainly after the resume
    parallel = _rank_bytes(tmp_path / "fp" / "iter_0000002")
    assert sum(plain.values()) > 0 and set(after) == set(plain)
    # plain: DP rank 0 writes every replicated tensor; fully parallel: both DP ranks write a real share
    assert plain.get(1, 0) < 0.05 * sum(plain.values()), plain
    assert min(parallel.get(0, 0), parallel.get(1, 0)) > 0.25 * sum(parallel.values()), parallel


@pytest.mark.multiproc
def test_dp_reshardable_recorded_and_tp_change_refused(tiny_root, tmp_path):
    ck = tmp_path / "ck"
    base = ("train.distributed_optimizer=true", "checkpoint.save_interval=2")
    run_on_ranks(
        run_train,
        2,
        tiny_overrides(tiny_root, ck, "train.steps=2", "checkpoint.optimizer_format=dp_reshardable", *base),
    )
    state = json.loads((latest_checkpoint(ck) / "train_state.json").read_text())
    assert state["optimizer"] == {
        "format": "dp_reshardable",
        "distributed": True,
        "tp": 1,
        "pp": 1,
        "vpp": None,
        "dp": 2,
    }
    with pytest.raises(Exception) as err:
        run_on_ranks(run_train, 2, tiny_overrides(tiny_root, ck, "train.steps=4", "parallel.tp=2", *base))
    msg = str(err.value)
    assert "checkpoint.optimizer_format=dp_reshardable" in msg and "parallel.tp: 1 -> 2" in msg, msg


@pytest.mark.multiproc
def test_fully_reshardable_distopt_save_records_format(tiny_root, tmp_path):
    """The default format with the distributed optimizer (the gather path) still saves at DP=2, fully parallel,
    and records what it wrote; a TP change is not refused for it (check_layout is a no-op)."""
    from megatron_camopd.backend.checkpoint_format import check_layout, saved_format

    ck = tmp_path / "ck"
    run_on_ranks(
        run_train,
        2,
        tiny_overrides(
            tiny_root, ck, "train.steps=1", "train.distributed_optimizer=true", "checkpoint.save_interval=1"
        ),
    )
    state = json.loads((latest_checkpoint(ck) / "train_state.json").read_text())
    assert saved_format(state) == "fully_reshardable" and state["optimizer"]["distributed"] is True
    check_layout("ck", state, 2, 1, None)
    with pytest.raises(CheckpointError, match="checkpoint.optimizer_format=dp_reshardable"):
        check_layout("ck", {**state, "optimizer": {**state["optimizer"], "format": "dp_reshardable"}}, 2, 1, None)
    assert saved_format({"step": 1}) == "fully_reshardable"  # checkpoints from before the record
