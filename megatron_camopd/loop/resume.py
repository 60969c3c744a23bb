"""What a run resumes from, decided before any model loads: `checkpoint.dir` is usable, the checkpoint verifies
(with `checkpoint.resume: auto`, the newest one that does), and the spec's differences from the spec the
checkpoint was trained with are reported field by field and either applied or refused.

Spec differences on resume (dotted field: old -> new, logged as a warning each; never silent):
  applied   train.lr, train.min_lr, train.warmup_steps, train.lr_decay: the LR schedule is rebuilt from the new
            values and continues at the resumed step (the new peak lr applies from that step on);
            train.steps: the run continues to the new total (the LR decay spans it);
            train.weight_decay, train.clip_grad, train.micro_batch_size, parallel.tp/pp (resharded), rollout.*,
            checkpoint.*, logging.*, launcher.*, teachers' transport fields (urls, timeouts, ...), model paths
            (the architecture itself is compared, see below), name/description.
  refused   model.dtype, model.tokenizer, the student architecture (config.json), method.*, schedule.*, data.*,
            routing.*, train.seed, train.adam_*, train.distributed_optimizer, parallel.vpp, adding/removing a
            teacher or changing its hf_path/checkpoint/weight: they change the model's shape, the method, the
            data order or the checkpoint layout. Start a new `checkpoint.dir` (or `checkpoint.resume: never`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_camopd.backend.checkpoint import META_DIR, newest_verified, open_verified, resolve_checkpoint
from megatron_camopd.backend.checkpoint_format import check_layout
from megatron_camopd.backend.model_source import ModelSource
from megatron_camopd.config import ExperimentSpec
from megatron_camopd.errors import CheckpointError, SpecError

log = logging.getLogger("megatron_camopd")

_APPLIED = {
    "train.lr": "the LR schedule is rebuilt with it from the resumed step on",
    "train.min_lr": "the LR schedule is rebuilt with it from the resumed step on",
    "train.warmup_steps": "the LR schedule is rebuilt with it from the resumed step on",
    "train.lr_decay": "the LR schedule is rebuilt with it from the resumed step on",
    "train.steps": "the run continues to the new total",
}
_REFUSED = {  # prefix -> why
    "model.dtype": "changes the parameter/optimizer state precision",
    "model.tokenizer": "changes the token ids",
    "method.": "changes the method",
    "schedule.": "changes the branch schedule",
    "data.": "changes the data order",
    "routing.": "changes the method",
    "train.seed": "changes the random streams",
    "train.adam_": "the optimizer state keeps the checkpoint's Adam settings",
    "train.distributed_optimizer": "changes the optimizer state layout",
    "parallel.vpp": "changes the model chunking",
}
_TEACHER_IDENTITY = ("hf_path", "checkpoint", "weight")
_ARCH_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


@dataclass
class ResumePlan:
    """The checkpoint to resume from (None: a fresh start) and its train_state."""

    path: Path | None = None
    state: dict | None = None


def check_checkpoint_dir(value: str) -> Path:
    """`checkpoint.dir` is a directory or can be created: no regular file on its parent chain, writable."""
    path = Path(value).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise SpecError(f"checkpoint.dir: {value}: {probe} is a dangling symlink")
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == path else f"is under {probe}, which is"
        raise SpecError(f"checkpoint.dir: {value} {where} a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "" if probe == path else f" (its existing parent {probe})"
        raise SpecError(f"checkpoint.dir: {value}{what} is not writable")
    return path


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


_ABSENT = "<absent>"


def spec_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted field, old, new) for every leaf that differs between two resolved specs."""
    a, b = _flatten(old), _flatten(new)
    return [
        (k, a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    ]


def judge(field: str, old, new) -> tuple[bool, str]:
    """(applied?, what happens) for one differing field; see the module docstring."""
    if field in _APPLIED:
        return True, _APPLIED[field]
    for prefix, why in _REFUSED.items():
        if field == prefix or (prefix.endswith((".", "_")) and field.startswith(prefix)):
            return False, why
    if field.startswith("teachers."):
        parts = field.split(".")
        if _ABSENT in (old, new) or len(parts) < 3 or parts[2] in _TEACHER_IDENTITY:
            return False, "changes the teachers"
    return True, "applies from the resumed step on"


def check_spec_changes(ckpt: Path, old_spec: dict | None, new_spec: dict) -> list[str]:
    """Log every differing field; raise a SpecError listing the refused ones. Returns the log lines."""
    if old_spec is None:
        log.warning("%s: train_state.json records no spec (older checkpoint); spec changes cannot be checked", ckpt)
        return []
    lines: list[str] = []
    refused: list[str] = []
    for field, old, new in spec_diff(old_spec, new_spec):
        ok, why = judge(field, old, new)
        line = f"{field}: {old!r} -> {new!r} ({why})"
        (lines if ok else refused).append(line)
    for line in lines:
        log.warning("resume from %s: spec differs: %s", ckpt, line)
    if refused:
        raise SpecError(
            f"resume from {ckpt}: the spec differs from the checkpoint's in fields that cannot change "
            f"on resume: {'; '.join(refused)}. Restore them, or start a new checkpoint.dir "
            f"(or checkpoint.resume=never)"
        )
    return lines


def check_architecture(ckpt: Path, student_config: dict) -> None:
    """The student's config.json must match the one recorded next to the checkpoint (shape fields)."""
    meta = next(
        (c / "config.json" for c in (ckpt / META_DIR, ckpt.parent / META_DIR) if (c / "config.json").is_file()), None
    )
    if meta is None:
        log.warning("%s: no %s/config.json next to the checkpoint; the architecture cannot be compared", ckpt, META_DIR)
        return
    try:
        theirs = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta}: unreadable ({exc})") from None
    keys = sorted((set(theirs) | set(student_config)) - _ARCH_IGNORED)
    diff = [
        f"{k}: {theirs.get(k, _ABSENT)!r} -> {student_config.get(k, _ABSENT)!r}"
        for k in keys
        if theirs.get(k, _ABSENT) != student_config.get(k, _ABSENT)
    ]
    if diff:
        raise SpecError(
            f"resume from {ckpt}: the student's architecture (model config.json) differs from the "
            f"checkpoint's ({meta}): {'; '.join(diff[:6])}. Start a new checkpoint.dir"
        )


def choose_checkpoint(spec: ExperimentSpec) -> ResumePlan:
    """Collective: the verified checkpoint `checkpoint.resume` names. `auto` takes the newest one that verifies
    (falling back past any that fails, saying so); an explicit path is refused when it fails."""
    mode = spec.checkpoint.resume
    if mode == "never":
        return ResumePlan()
    found = open_verified(resolve_checkpoint(mode)) if mode != "auto" else newest_verified(spec.checkpoint.dir)
    return ResumePlan(*found) if found else ResumePlan()


def plan_resume(spec: ExperimentSpec) -> ResumePlan:
    """Collective, before any model loads: start torch.distributed (as open_session would; it is idempotent),
    check `checkpoint.dir`, choose and verify the checkpoint and judge the spec's differences from it."""
    from megatron_camopd.backend.cpu_runtime import init_distributed

    check_checkpoint_dir(spec.checkpoint.dir)
    p = spec.parallel
    init_distributed(p.tp, p.pp, p.vpp, seed=spec.train.seed)
    plan = choose_checkpoint(spec)
    if plan.path is not None:
        student = ModelSource.resolve(spec.model.hf_path, spec.model.checkpoint, "model")
        check_architecture(plan.path, student.hf_config())
        assert plan.state is not None, "a chosen checkpoint comes with its train_state"
        check_spec_changes(plan.path, plan.state.get("spec"), json.loads(json.dumps(spec.to_dict())))
        if spec.train.distributed_optimizer:  # a dp_reshardable optimizer state cannot follow a TP/PP change
            check_layout(plan.path, plan.state, p.tp, p.pp, p.vpp)
    return plan
