"""metrics.jsonl rows are appended per step, replayed steps are dropped on resume, non-finite values become null,
and wandb (offline) receives the same rows."""

from __future__ import annotations

import json

from megatron_camopd.loop.metrics import MetricsWriter, read_metrics


def test_rows_resume_truncation_and_nan(tmp_path):
    w = MetricsWriter(tmp_path, 4, progress="off")
    for s in (1, 2, 3):
        w.log({"step": s, "loss": float(s), "grad_norm": float("nan")})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["grad_norm"] is None
    w = MetricsWriter(tmp_path, 4, start_step=2, progress="off")  # resumed from the step-2 checkpoint
    w.log({"step": 3, "loss": 30.0})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_progress_lines_and_wandb_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = MetricsWriter(
        tmp_path, 2, progress="lines", wandb_cfg={"enabled": True, "mode": "offline", "project": "t", "run_name": "r"}
    )
    w.log({"step": 1, "loss": 0.5, "branch": "general"})
    w.close()
    assert "[camopd] step 1/2 branch=general loss=0.5" in capsys.readouterr().out
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 0.5
