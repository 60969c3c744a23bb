"""`camopd demo --quick` and `camopd compare` end to end (real subprocesses, real Megatron on CPU).

Checks the structure of the outputs (summary keys and ranges, valid PNGs, report tables, caching on a re-run,
the comparison table), not the story: quick sizes are far too small for the accuracies to mean anything.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, repo_env, run_cli

pytestmark = pytest.mark.multiproc


def _camopd(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout, env=repo_env(), cwd=REPO, check_rc=0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    proc = _camopd("demo", "--out", str(out), "--quick", "--seeds", "2")
    return out, proc.stdout


def _valid_png(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    return img.shape[:2]


def test_quick_demo_outputs(demo_dir):
    out, stdout = demo_dir
    for phase in ("phase 1/5", "phase 2/5", "phase 3/5", "phase 4/5", "phase 5/5"):
        assert f"[demo] {phase}" in stdout
    assert "[camopd] step" in stdout  # the trainer's per-step progress
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"general", "domain", "seeds"}
    seeds = summary["seeds"]
    assert seeds["ids"] == [0, 1]
    for b in ("general", "domain"):
        assert set(summary[b]) == {"general_teacher", "domain_teacher", "camopd", "mopd_1to1"}
        assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in summary[b].values())
        for m in ("camopd", "mopd_1to1"):  # the mean is the mean of the per-seed values
            assert len(seeds[b][m]) == 2
            assert summary[b][m] == pytest.approx(sum(seeds[b][m]) / 2)
    for png in ("accuracy.png", "signals.png"):
        _valid_png(out / png)
    report = (out / "report.md").read_text()
    assert "| model | general | domain | general per seed |" in report
    assert "| CaMOPD |" in report and "| MOPD (1:1) |" in report
    assert "**Does CaMOPD beat vanilla MOPD (1:1) here?**" in report and "CI, 2 seeds" in report
    assert "**Is counteraction present?**" in report
    assert "![accuracy over steps](accuracy.png)" in report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["run"], r["seed"]) for r in rows} == {(m, k) for m in ("camopd", "mopd_1to1") for k in (0, 1)}
    camopd = [r for r in rows if r["run"] == "camopd" and r["seed"] == 0]
    assert [r["branch"] for r in camopd] == ["general", "general", "general", "domain"]  # G,G,G,D
    assert any(r.get("diag_grad_dot") is not None for r in camopd)
    evals = json.loads((out / "evals.json").read_text())
    assert any(k.startswith("distill_camopd_seed1:") for k in evals)


def test_rerun_reuses_cached_phases(demo_dir):
    out, _ = demo_dir
    before = (out / "summary.json").read_text()
    stdout = _camopd("demo", "--out", str(out), "--quick", "--seeds", "2").stdout
    for name in ("general_teacher", "domain_teacher", "distill_camopd_seed0", "distill_mopd_1to1_seed1"):
        assert f"[demo] {name}: cached" in stdout
    assert "training (" not in stdout
    assert (out / "summary.json").read_text() == before


def test_compare_table(demo_dir, tmp_path):
    out, _ = demo_dir
    cmp_dir = tmp_path / "cmp"
    stdout = _camopd(
        "compare",
        str(out / "specs" / "distill.yaml"),
        "--seeds",
        "2",
        "--methods",
        "mopd_1to1",
        "camopd_no_select",
        "--steps",
        "2",
        "--out",
        str(cmp_dir),
    ).stdout
    assert "| MOPD (1:1) |" in stdout and "| CaMOPD w/o selection |" in stdout
    data = json.loads((cmp_dir / "compare.json").read_text())
    assert data["domains"] == ["domain", "general"] and data["seeds"] == 2
    assert set(data["results"]) == {"mopd_1to1", "camopd_no_select"}
    for runs in data["results"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
            assert set(r["normalised"]["per_domain"]) == {"domain", "general"}
            assert "cross_cos_mean" in r["instruments"] and r["seconds"] > 0
    s = data["summary"]["camopd_no_select"]
    base, mine = data["results"]["mopd_1to1"], data["results"]["camopd_no_select"]
    diffs = [a["accuracy"]["general"] - b["accuracy"]["general"] for a, b in zip(mine, base)]
    assert s["paired"]["general"]["per_seed"] == pytest.approx(diffs)  # paired by seed
    assert s["paired"]["general"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert "paired" not in data["summary"]["mopd_1to1"]
    md = (cmp_dir / "compare.md").read_text()
    assert "| method |" in md and " ± " in md and "Cost:" in md and "Cross-branch instruments" in md
    assert "corrected cos [CI]" in md and "GCG gen / null" in md and "Per task (%)" in md
    assert "- **P2 " in md and "- **P0 not measured**" in md  # no 1:0 run here: the precondition is not measured
    for runs in data["results"].values():
        for r in runs:  # every diagnosed step is labelled by branch; step 0 never is one
            assert "diag_steps/general" in r["instruments"] and set(r["series"]) >= {"cos", "dot"}
    _valid_png(cmp_dir / "compare.png")


def test_signoff_setting_runs(tmp_path):
    out = tmp_path / "signoff"
    _camopd("demo", "--out", str(out), "--quick", "--setting", "signoff", "--seeds", "1")
    setting = json.loads((out / "setting.json").read_text())
    assert setting["setting"] == "signoff" and setting["demo_methods"][0] == "opd_general"
    evals = json.loads((out / "evals.json").read_text())
    domain_tasks = {t for k, v in evals.items() if k.startswith("distill_") for t in v["domain"]["per_task"]}
    assert domain_tasks == {"signoff_reverse", "signoff_sort", "signoff_copy"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {"opd_general", "mopd_1to1", "camopd"}
    assert all(r["step"] > 1 for r in rows if any(k.startswith("diag_") for k in r))  # step 0 skipped
