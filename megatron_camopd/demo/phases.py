"""Cached demo phases: run a training spec once, reuse its output while its settings hash is unchanged.

A phase writes its spec to `DIR/specs/NAME.yaml`, trains in this process (`train.train`; sessions are built one
after another, `init_distributed` is idempotent) into `DIR/NAME/`, and records `DIR/NAME/demo_phase.json` with
the settings hash and wall time. The next run skips a phase whose record exists with the same hash; a changed
hash (or a missing record, e.g. after a crash) wipes the directory and re-runs it. Evaluations are cached the
same way in `DIR/evals.json`, keyed by what was evaluated and the hash of the model that produced it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_camopd.demo.setting import write_spec
from megatron_camopd.errors import CamopdError

log = logging.getLogger("megatron_camopd")


def say(msg: str) -> None:
    """A phase line on stdout (the trainer prints its own per-step lines)."""
    print(f"[demo] {msg}", flush=True)


def _record(out: Path) -> dict | None:
    try:
        return json.loads((out / "demo_phase.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_phase(
    root: Path, name: str, spec: dict | Path, digest: str, overrides: Sequence[str] = ()
) -> tuple[Path, bool]:
    """Train `spec` (a dict, or a spec file) + overrides into `root/name` unless a run with the same digest is
    there. Returns (run dir, whether it trained)."""
    from megatron_camopd.config import load_spec
    from megatron_camopd.loop.train import train

    out = (root / name).resolve()
    rec = _record(out)
    if rec is not None and rec.get("digest") == digest:
        say(f"{name}: cached ({out}, hash {digest})")
        return out, False
    if out.exists():
        shutil.rmtree(out)
    overrides = list(overrides)
    if isinstance(spec, dict):
        path = write_spec(
            dict(spec, checkpoint=dict(spec["checkpoint"], dir=str(out))), root / "specs" / f"{name}.yaml"
        )
    else:
        path, overrides = Path(spec), overrides + [f"checkpoint.dir={out}"]
    t0 = time.time()
    say(f"{name}: training (spec {path}{'; ' + ' '.join(overrides) if overrides else ''})")
    last = train(load_spec(path, overrides))
    dt = time.time() - t0
    if last and last.get("preempted"):  # a signal stopped it after a checkpoint: not a finished phase
        raise CamopdError(
            f"{name}: stopped by a signal at step {last.get('step')} (checkpoint saved in {out}); "
            "not recorded as done: the next run trains it again"
        )
    tmp = out / "demo_phase.json.tmp"
    tmp.write_text(json.dumps({"digest": digest, "seconds": round(dt, 1), "overrides": overrides}))
    os.replace(tmp, out / "demo_phase.json")
    say(f"{name}: done in {dt:.0f}s")
    return out, True


def phase_seconds(root: Path, name: str) -> float | None:
    rec = _record(root / name)
    return rec.get("seconds") if rec else None


class EvalCache:
    """JSON-file cache of evaluation results keyed by a caller-built key (which includes a model hash)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        if key not in self.data:
            self.data[key] = compute()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        return self.data[key]


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, iter dir) of every complete checkpoint of a run, by step."""
    out = []
    for p in sorted(run_dir.glob("iter_*")):
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "train_state.json").exists():
            out.append((int(p.name.split("_")[1]), p))
    return out
