"""Every method of the registry trains through the real Megatron engine from a YAML spec + overrides, and the
gradient diagnostics appear in metrics.jsonl when asked for."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megatron_camopd.backend.spawn import run_on_ranks

from ._workers import run_methods, tiny_overrides

MIXED = ("schedule.mode=mixed", "schedule.mix_ratio=[1,1]")
RUNS = {
    "mopd_1to1": ("method.name=mopd", *MIXED),
    "mopd_3to1": ("method.name=mopd", "schedule.mode=mixed", "schedule.mix_ratio=[3,1]"),
    "camopd_mixed": ("method.name=camopd", *MIXED, "logging.diagnostics=true", "logging.diagnostics_interval=1"),
    "camopd_alt_diag": ("logging.diagnostics=true", "logging.diagnostics_interval=1", "schedule.n_g=1"),
    "camopd_diag_one": ("logging.diagnostics=true", "logging.diagnostics_samples=1"),
    "uniopd": (
        "method.name=uniopd",
        *MIXED,
        "rollout.n_samples=2",
        "rollout.prompts_per_step=4",
        "data.streams.0.verifier=exact",
        "data.streams.1.verifier=exact",
    ),
    "uniopd_offline": (
        "method.name=uniopd",
        *MIXED,
        "rollout.n_samples=2",
        "rollout.prompts_per_step=4",
        "data.streams.0.verifier=exact",
        "data.streams.1.verifier=exact",
        "method.uniopd.offline_balance=true",
        "method.uniopd.offline_n=2",
        "data.streams.0.limit=6",
        "data.streams.1.limit=6",
        "method.uniopd.offline_shape=mirrored_j",
    ),
    "relaxed_opd": ("method.name=relaxed_opd", *MIXED),
    "selectkd": ("method.name=selectkd", *MIXED),
    "exopd": ("method.name=exopd", *MIXED),
}


@pytest.mark.multiproc
def test_all_methods_train(tiny_root, tmp_path):
    runs = {k: tiny_overrides(tiny_root, tmp_path / k, "train.steps=2", *v) for k, v in RUNS.items()}
    res = run_on_ranks(run_methods, 1, runs)[0]
    check_recorded_curves(res)
    for name, rows in res.items():
        assert [r["step"] for r in rows] == [1, 2], name
        for r in rows:
            assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), (name, r)
            assert r["teacher_failed"] == 0
            for key in ("mean_gap", "entropy", "reverse_kl", "tokens_per_s", "selected_fraction"):
                assert key in r, (name, key)
    assert "acceptance_rate" in res["selectkd"][0]
    assert res["mopd_3to1"][0]["selected_fraction"] == 1.0  # vanilla MOPD keeps every sample
    assert "reward_mean" in res["uniopd"][0]
    hist = json.loads((tmp_path / "uniopd_offline" / "offline_balance" / "general.hist.json").read_text())
    assert hist["prompts_before"] == 6 and sum(hist["hist_before"]) == 6
    assert hist["prompts_after"] == sum(hist["hist_after"]) >= 6
    # step 0 is never diagnosed (diagnostics_start 1: the student still equals the domain teacher)
    assert not any(k.startswith("diag_") for k in res["camopd_mixed"][0])
    mixed = res["camopd_mixed"][1]
    assert math.isfinite(mixed["diag_grad_dot"]) and -1.0 <= mixed["diag_grad_cos"] <= 1.0
    for key in ("norm_ratio", "counteracted", "split_cos/general", "split_cos/domain"):
        assert f"diag_{key}" in mixed, key
    for b in ("general", "domain"):  # a mixed step reports each branch's coherence under its own label
        assert mixed[f"diag_coherence_full/{b}"] > 0 and f"diag_gap_gcg_null/{b}" in mixed, b
    alt = res["camopd_alt_diag"]  # G, D: the second step compares against the cached general batch
    assert alt[0]["branch"] == "general" and alt[1]["branch"] == "domain"
    assert "diag_grad_dot" not in alt[0] and math.isfinite(alt[1]["diag_grad_dot"])
    assert "diag_coherence_full/domain" in alt[1] and "diag_coherence_full/general" not in alt[1]
    # capped per-sample gradients: the coherence of a single gradient is exactly 1 (the full batch's is below 1)
    assert res["camopd_diag_one"][1]["diag_coherence_full/general"] == pytest.approx(1.0, abs=1e-9)
    assert mixed["diag_coherence_full/general"] < 0.999


RECORDED = Path(__file__).with_name("recorded_curves.json")


def _cpu() -> tuple[str, str]:
    """The CPU's model name and a digest of its feature flags (they pick the BLAS / oneDNN kernels)."""
    import hashlib
    import platform

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted((info.get("flags") or info.get("Features") or "").split()))
    return model, hashlib.sha256(flags.encode()).hexdigest()[:12]


def _machine() -> dict:
    """What decides float rounding on CPU: where the fingerprint matches a recording, curves must be bitwise."""
    model, flags = _cpu()
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": model,
        "cpu_flags": flags,
        "threads": os.cpu_count(),
    }


def check_recorded_curves(res: dict[str, list[dict]]) -> None:
    """Loss and grad-norm curves of every method against values recorded with the code as it was before the
    restructure (01ac92d; CAMOPD_RECORD_CURVES=1 adds this machine's). Bitwise on a kind of machine that has a
    recording; elsewhere within rel 1e-5 + abs 1e-6 of every recording (machines round differently: ~3e-6
    relative, ~5e-8 absolute on a loss near zero, between the two recorded here)."""
    curves = {name: [[r["loss"].hex(), r["grad_norm"].hex()] for r in rows] for name, rows in res.items()}
    recordings = json.loads(RECORDED.read_text())["recordings"]
    if os.environ.get("CAMOPD_RECORD_CURVES") == "1":
        recordings = [r for r in recordings if r["machine"] != _machine()]
        recordings.append({"machine": _machine(), "code": "recorded by CAMOPD_RECORD_CURVES=1", "curves": curves})
        RECORDED.write_text(json.dumps({"recordings": recordings}, indent=1) + "\n")
        return
    for rec in recordings:
        assert sorted(rec["curves"]) == sorted(curves)
        if rec["machine"] == _machine():
            assert curves == rec["curves"], rec["code"]
        for name, rows in rec["curves"].items():
            got = [float.fromhex(x) for row in curves[name] for x in row]
            assert got == pytest.approx([float.fromhex(x) for row in rows for x in row], rel=1e-5, abs=1e-6), (
                name,
                rec["code"],
            )
