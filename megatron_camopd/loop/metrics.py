"""Run metrics: one JSON row per step in `metrics.jsonl` next to the checkpoint, wandb when enabled, progress.

Locally (a TTY) progress is a tqdm bar; under Slurm or when output is not a terminal it is a periodic log line,
so `logs/%x-%j.out` stays readable. Rows are appended and flushed each step, so a crash or a preemption loses
nothing already logged; on resume, rows past the resumed step are dropped so the file has one row per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("megatron_camopd")


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors to floats, non-finite floats to None (JSON has no NaN)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics.jsonl file (the loss-curve reader used by tests, plots and reports)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


class MetricsWriter:
    """Appends step rows to `<dir>/metrics.jsonl` (rank 0 only) and mirrors them to wandb and a progress display."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        progress: str = "auto",
        log_interval: int = 1,
        wandb_cfg: dict | None = None,
        run_config: dict | None = None,
        filename: str = "metrics.jsonl",
    ) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self._bar = None
        self._wandb = None
        self._t0 = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ else "lines"
        self.progress = progress
        if progress == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if wandb_cfg and wandb_cfg.get("enabled"):
            import wandb

            mode = wandb_cfg.get("mode") or "offline"
            self._wandb = wandb.init(
                project=wandb_cfg.get("project") or "megatron_camopd",
                entity=wandb_cfg.get("entity"),  # None: the API key's default entity
                name=wandb_cfg.get("run_name"),
                mode=mode,  # type: ignore[arg-type]  # LoggingConfig.wandb.mode is validated against wandb's modes
                dir=str(self.path.parent),
                config=run_config or {},
                resume="allow",
            )

    def _truncate_after(self, start_step: int) -> None:
        """On resume keep only rows of steps already done, so replayed steps are not logged twice."""
        if not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = _clean(dict(row))
        row.setdefault("time", round(time.time() - self._t0, 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))
        step = row.get("step", 0)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=row.get("loss"), branch=row.get("branch"), refresh=False)
        elif self.progress == "lines" and (step % self.log_interval == 0 or step == self.total_steps):
            keys = ("branch", "loss", "grad_norm", "selected_fraction", "mean_gap", "entropy", "tokens_per_s")
            parts = [
                f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}" for k in keys if k in row
            ]
            print(f"[camopd] step {step}/{self.total_steps} " + " ".join(parts), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
