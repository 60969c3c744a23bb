"""Checkpoints with megatron-core `dist_checkpointing`: model, optimizer, LR schedule, training state, RNG.

Layout under `checkpoint.dir`:
    iter_0000012/            dist_checkpointing files (model + optimizer, resharding-capable)
        train_state.json     step, branch-schedule position, data-stream positions, anything JSON, and the
                             megatron-core version that wrote the checkpoint (`megatron_core`; rank 0)
        scheduler.pt         OptimizerParamScheduler state (rank 0)
        rng/rank{r}.pt       per-rank RNG states (restored only when the world layout is unchanged)
        inflight_rollouts.pt rollout batches in flight at the save (`rollout.max_staleness` > 0; rollout/pipeline.py)
        manifest.json        size + sha256 of every file above, written last (backend/manifest.py)
    latest                   text file naming the newest complete checkpoint
    metrics.jsonl            (written by loop/metrics.py)

Writes are atomic: everything goes to `iter_N.tmp/`; once every rank has finished, the files are hashed into
`manifest.json` (written last, tmp+rename), then the directory is renamed to `iter_N/` and `latest` is replaced
with os.replace. A crash mid-save leaves the previous checkpoint loadable. A checkpoint is complete only with its
manifest; every load verifies it first and refuses a missing, truncated or corrupted file by name (a
CheckpointError), and every other load failure (torch's CheckpointException, which is a BaseException, pickle or
JSON errors, empty files) is a CheckpointError too. `resume_candidates` lists the complete checkpoints newest
first; `newest_verified` returns the newest that verifies in one call (`checkpoint.resume: auto`, loop/resume.py).
Checkpoints written before manifests existed (train_state.json, no manifest.json) are *unverified*: they are
used, with a warning, only when a directory holds no verified checkpoint, or when named explicitly.

No helper process outlives the trainer: megatron-core's torch_dist writer collects its results through a
module-level queue that it creates, on first use, as a `spawn` multiprocessing Manager (a ~270 MB server process
plus the multiprocessing resource tracker, both surviving a `kill -9` of the trainer). Saves here are synchronous
and the results are read back in this process, so that queue is provided as an in-process `queue.Queue` before
the first save (`_in_process_write_results`); the per-save forked writers exit when their files are written.
Sharded tensors are matched by their global keys, so a checkpoint saved at TP=2/PP=2 loads at TP=1 (resharding).

Layer specs: the local spec saves TransformerEngine's parameter names, but TE modules also carry `_extra_state`
objects (FP8 scaling state) that a local-spec model neither saves nor requests (e.g. `core_attention._extra_state`).
Loads therefore tolerate exactly those: requested `_extra_state` entries the checkpoint lacks are left at the
model's initial state (logged), and `_extra_state` the model does not request is not read. Any other missing
tensor is still an error. So a checkpoint written on a CPU machine (`camopd convert --from-hf`) loads into a TE
model on the cluster, and a TE checkpoint loads into the local spec (conversion, CPU evaluation).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import pickle
import queue
import random
import shutil
import signal
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_camopd.backend import checkpoint_format as fmt_
from megatron_camopd.backend.manifest import MANIFEST, has_manifest, verify_manifest, write_manifest
from megatron_camopd.errors import CheckpointError

log = logging.getLogger("megatron_camopd")

# the installed distribution's version (megatron.core.__version__ appends the short hash of whatever git checkout
# holds its files, e.g. "0.19.2+a8b7d6b" for a virtualenv inside this repository)
MCORE_VERSION = importlib.metadata.version("megatron-core")
EXTRA_STATE = "_extra_state"

VERSION_KEY = "megatron_core"  # train_state.json: the megatron-core version that wrote the checkpoint


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _is_legacy(path: Path) -> bool:
    """Written before manifests: complete by the old rule (train_state.json) but unverifiable."""
    return (path / "train_state.json").is_file() and not has_manifest(path)


def resume_candidates(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, newest first (the one `latest` names leads). Directories without a
    manifest are skipped unless the root has no manifest at all (legacy checkpoints: unverified, warned)."""
    root = Path(root)
    dirs = sorted((p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    done = [p for p in dirs if has_manifest(p)]
    if not done:
        done = [p for p in dirs if _is_legacy(p)]
    marker = root / "latest"
    try:
        named = root / marker.read_text().strip() if marker.is_file() else None
    except (OSError, UnicodeDecodeError):
        named = None
    if named in done:
        done.remove(named)
        done.insert(0, named)
    return done


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (via `latest`, else the highest complete iter_* dir)."""
    done = resume_candidates(root)
    return done[0] if done else None


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """Collective: `path` is a complete checkpoint whose files match its manifest, else a CheckpointError naming
    the file. A legacy checkpoint (no manifest) passes with a warning that it cannot be verified."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not has_manifest(path):
        if not _is_legacy(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
        log.warning("%s: no %s (written before checkpoint manifests); loading it unverified", path, MANIFEST)
        return path
    verify_manifest(path)
    return path


def _rank0_candidates(root: str | os.PathLike) -> list[Path]:
    """`resume_candidates(root)` as rank 0 sees it (one listing for all ranks: a shared filesystem may show a
    directory being renamed to some ranks before others)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return resume_candidates(root)
    box: list[list[Path] | None] = [resume_candidates(root) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    assert box[0] is not None, "rank 0 sends its listing"
    return box[0]


def open_verified(path: str | os.PathLike) -> tuple[Path, dict]:
    """Collective: verify the checkpoint at `path` (CheckpointError naming the file) and read its train_state."""
    path = verify_checkpoint(path)
    return path, _read_train_state(path)


def newest_verified(root: str | os.PathLike) -> tuple[Path, dict] | None:
    """Collective: the newest checkpoint under `root` that verifies, with its train_state; None when `root` holds
    none. A newer checkpoint that fails verification is skipped with a warning naming it and why; when every
    one fails, a CheckpointError lists them all (nothing is trained on a corrupted file)."""
    failures = []
    for path in _rank0_candidates(root):
        try:
            found = open_verified(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            log.warning(
                "checkpoint %s fails verification: %s; falling back to the previous complete checkpoint", path, exc
            )
            continue
        if failures:
            log.warning("resuming from %s, the newest checkpoint that verifies (%d newer failed)", path, len(failures))
        return found
    if failures:
        raise CheckpointError(f"{root}: no checkpoint verifies: {'; '.join(failures)}")
    return None


def _in_process_write_results() -> None:
    """Give megatron-core's torch_dist writer an in-process results queue instead of the `spawn` Manager it
    would start on first use (see the module docstring). Valid because saves here are synchronous."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _model_sharded(models: list) -> dict:
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    root,
    step: int,
    models: list,
    optimizer=None,
    scheduler=None,
    train_state: dict | None = None,
    keep_last: int | None = None,
    files: dict[str, Any] | None = None,
    *,
    optimizer_format: str = fmt_.LEGACY_FORMAT,
    fully_parallel: bool = False,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. `files` (rank 0's): objects saved with
    torch.save under their relative names inside the checkpoint, so its manifest covers them too.
    `optimizer_format`, `fully_parallel`: checkpoint.optimizer_format / checkpoint.fully_parallel
    (backend/checkpoint_format.py); the format is recorded in train_state."""
    root = Path(root)
    rank = dist.get_rank()
    final = root / _iter_name(step)
    tmp = root / (_iter_name(step) + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    sharded = _model_sharded(models)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=fmt_.metadata(optimizer_format))
        train_state = {**(train_state or {}), fmt_.STATE_KEY: fmt_.record(optimizer_format, optimizer)}
    # dist_checkpointing may start writer processes; they must not die of the preemption signal that asked for
    # this very save. Block it while they start (they inherit the mask); a pending signal is delivered after.
    blocked = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    _in_process_write_results()
    try:
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=fmt_.save_strategy(fully_parallel))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save({"world": dist.get_world_size(), "state": _rng_state()}, tmp / "rng" / f"rank{rank}.pt")
    if rank == 0:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rel, obj in (files or {}).items():
            torch.save(obj, tmp / rel)
        with open(tmp / "train_state.json", "w") as f:
            json.dump({"step": step, **(train_state or {}), VERSION_KEY: MCORE_VERSION}, f, indent=1)
    write_manifest(tmp)  # collective: barrier, hash the files spread over the ranks, rank 0 writes it last
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name + "\n")
        os.replace(marker_tmp, root / "latest")
        if keep_last:
            olds = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for p in olds[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def _check_optimizer_loadable(optimizer) -> None:
    """megatron-core 0.16's distributed optimizer can only load its state with TE's or Apex's fused Adam (its
    torch-Adam path keeps a per-parameter `step` the checkpoint format has no slot for). Say so plainly."""
    from megatron.core.optimizer import distrib_optimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if any(isinstance(s, distrib_optimizer.DistributedOptimizer) for s in subs) and not getattr(
        distrib_optimizer, "HAVE_APEX_OR_TE", False
    ):
        raise CheckpointError(
            "resuming train.distributed_optimizer=true needs TransformerEngine or Apex (GPU); "
            "on CPU set train.distributed_optimizer=false (model-only loads work either way)"
        )


def _describe(exc: BaseException) -> str:
    """One line for a load failure; torch's CheckpointException carries per-rank exceptions and their tracebacks
    in its str(), which must not reach the user."""
    if isinstance(exc, CheckpointException):
        parts = {_describe(e) for e, *_ in exc.failures.values()}
        return "; ".join(sorted(parts)) or "torch.distributed.checkpoint failed"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ("file ended early (truncated?)" if isinstance(exc, EOFError) else "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


_UNREADABLE = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    TypeError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    AttributeError,
    IndexError,
)


def _torch_load(path: Path):
    try:
        return torch.load(path, weights_only=False)
    except _UNREADABLE as exc:
        raise CheckpointError(f"{path}: unreadable ({_describe(exc)})") from None


def _read_train_state(path: Path) -> dict:
    f = path / "train_state.json"
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f}: unreadable ({_describe(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{f}: no integer 'step' (is it a camopd checkpoint?)")
    return state


def read_train_state(path: str | os.PathLike) -> dict:
    """train_state.json of a checkpoint (step, schedule/data positions, the spec it was trained with)."""
    return _read_train_state(Path(path))


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("rc")[0].split(".")[:3] if x.isdigit())


def _versions(path: Path, state: dict, running: str = MCORE_VERSION) -> str:
    """Which megatron-core wrote the checkpoint and which reads it, when they differ (a load failure's likely
    cause: megatron-core reads the checkpoints of its own and older versions, not newer ones; 0.16 cannot read
    0.19's). Checkpoints before the version was recorded: a missing common.pt means megatron-core >= 0.17."""
    written = state.get(VERSION_KEY)
    if written is None and not (path / "common.pt").exists() and _release(running) < (0, 17):
        written = ">= 0.17 (it has no common.pt)"
    if written == running:
        return ""
    if written is None:
        return f" (written by a megatron-core it does not record; this is megatron-core {running})"
    note = f" (written by megatron-core {written}; this is megatron-core {running}"
    newer = written.startswith(">=") or _release(written) > _release(running)
    return note + (": load it with the megatron-core that wrote it, or a newer one)" if newer else ")")


def load_checkpoint(
    path,
    models: list,
    optimizer=None,
    scheduler=None,
    *,
    strict: bool = True,
    verify: bool = True,
    fully_parallel: bool = False,
) -> dict:
    """Collective: load model (+ optimizer, scheduler, RNG when present) from `path`; returns train_state.

    The manifest is verified first (skip with verify=False when the caller just did). Hyperparameters come from
    the objects given, not the checkpoint: the scheduler keeps its own lr/min_lr/warmup/decay settings (only its
    step count is restored) and the optimizer's param groups keep their max_lr/min_lr, so a resumed run follows
    the spec's schedule from the resumed step on (loop/resume.py reports such spec differences). The optimizer
    state is read in the format the checkpoint records (checkpoint_format.py); `fully_parallel`: the reads are
    spread over the DP group (checkpoint.fully_parallel)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    elif not (has_manifest(path) or _is_legacy(path)):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
    state = _read_train_state(path)
    if optimizer is not None:
        from megatron.core import parallel_state as ps

        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        fmt_.check_layout(
            path, state, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(), vpp
        )
        _check_optimizer_loadable(optimizer)
    sharded = _model_sharded(models)
    if optimizer is not None:
        meta = fmt_.metadata(fmt_.saved_format(state))
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=meta)
    try:  # RETURN_UNEXPECTED: requests the checkpoint cannot serve are dropped and returned, then judged below
        loaded, _, unexpected = dist_checkpointing.load(
            sharded,
            str(path),
            sharded_strategy=fmt_.load_strategy(fully_parallel, str(path)),
            strict=StrictHandling.RETURN_UNEXPECTED,
        )
    except (Exception, CheckpointException) as exc:  # dist_checkpointing raises many kinds; name the checkpoint
        raise CheckpointError(
            f"{path}: cannot load into this model: {_describe(exc)}{_versions(path, state)}"
        ) from None
    _check_absent(path, unexpected)
    if state.get(VERSION_KEY, MCORE_VERSION) != MCORE_VERSION:
        log.info("%s: written by megatron-core %s, loaded by %s", path, state[VERSION_KEY], MCORE_VERSION)
    names = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for name, m in zip(names, models):
        result = m.load_state_dict(loaded[name], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointError(f"{path}: {name}: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    if optimizer is not None:
        _load_optimizer(path, optimizer, loaded["optimizer"], fmt_.hint(state))
    if scheduler is not None and (path / "scheduler.pt").exists():
        _load_scheduler(path / "scheduler.pt", scheduler)
    rng_file = path / "rng" / f"rank{dist.get_rank()}.pt"
    if rng_file.exists():
        rng = _torch_load(rng_file)
        try:
            if rng["world"] == dist.get_world_size():
                _set_rng_state(rng["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{rng_file}: not an RNG state ({_describe(exc)})") from None
    return state


# Per-group schedule settings the spec owns (megatron-core's OptimizerParamScheduler reads them from each group).
# megatron-core >= 0.19 pairs saved and current param groups on a key that includes them, so a resume with a new
# train.lr would find no saved group; the saved groups take the current values first (`_adopt_schedule_settings`).
SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _pair_key(group: dict) -> tuple:
    """megatron-core's parameter-group identity without the schedule settings (0.16: wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr; 0.19 adds the optimizer name). NeMo's `pre_` aliases count too."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    keys = [k for k in param_group_identifier_keys if k not in SCHEDULE_KEYS]
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys)


def _saved_group_lists(state) -> list[list[dict]]:
    """Every `param_groups` list in a loaded optimizer state (one per inner optimizer, however nested)."""
    found: list[list[dict]] = []
    if isinstance(state, dict):
        for k, v in state.items():
            if k == "param_groups" and isinstance(v, list) and all(isinstance(g, dict) for g in v):
                found.append(v)
            else:
                found.extend(_saved_group_lists(v))
    elif isinstance(state, list | tuple):
        for v in state:
            found.extend(_saved_group_lists(v))
    return found


def _adopt_schedule_settings(saved: list[dict], current: list[dict]) -> int:
    """Give each saved param group the schedule settings (SCHEDULE_KEYS) of the current group it pairs with on
    every other identifying key (in order, when several share a key). A saved group without a counterpart keeps
    its own, and megatron-core's load then refuses the mismatch. Returns how many groups were paired."""
    pool: dict[tuple, list[dict]] = {}
    for g in current:
        pool.setdefault(_pair_key(g), []).append(g)
    paired = 0
    for g in saved:
        mates = pool.get(_pair_key(g))
        if not mates:
            continue
        mate = mates.pop(0)
        for k in SCHEDULE_KEYS:
            if k in mate:
                g[k] = mate[k]
            else:
                g.pop(k, None)
        paired += 1
    return paired


def _load_optimizer(path: Path, optimizer, state, hint: str = "") -> None:
    """The checkpoint's optimizer state (Adam moments, fp32 main weights, step) under the current optimizer's
    schedule settings: a resume with a changed train.lr / min_lr / weight decay takes the new ones."""
    for groups in _saved_group_lists(state):
        _adopt_schedule_settings(groups, optimizer.param_groups)
    try:
        optimizer.load_state_dict(state)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this optimizer: {_describe(exc)}{hint}") from None


def _load_scheduler(file: Path, scheduler) -> None:
    sd = _torch_load(file)
    override = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True  # the spec's lr schedule, the checkpoint's step count
    try:
        scheduler.load_state_dict(sd)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{file}: not an LR-scheduler state ({_describe(exc)})") from None
    finally:
        scheduler.override_opt_param_scheduler = override


def _check_absent(path: Path, unexpected: set) -> None:
    """Requests absent from the checkpoint: `_extra_state` of TransformerEngine modules (a local-spec checkpoint
    has none) is fine and logged; anything else is a CheckpointError naming the keys."""
    extra = sorted(k for k in unexpected if k.split("/")[0].endswith(EXTRA_STATE))
    others = sorted(set(unexpected) - set(extra))
    if others:
        raise CheckpointError(
            f"{path}: the checkpoint has no {', '.join(others[:4])}"
            + (f" (+{len(others) - 4} more)" if len(others) > 4 else "")
        )
    if extra:
        log.info(
            "%s: %d _extra_state entries (TransformerEngine FP8 state) not in the checkpoint, e.g. %s; "
            "kept at their initial values",
            path,
            len(extra),
            extra[0],
        )


def load_model_only(path, models: list) -> dict:
    """Load just the model weights (teachers, evaluation, conversion) from a checkpoint saved at any TP/PP."""
    return load_checkpoint(path, models, optimizer=None, scheduler=None)


META_DIR = "hf"  # under the checkpoint root: the HF config.json and tokenizer files the model was built from


def write_model_meta(root, hf_config: dict, tokenizer_dir=None) -> Path:
    """Record the architecture (HF config.json) and tokenizer next to the checkpoints (rank 0 only)."""
    meta = Path(root) / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    tmp = meta / "config.json.tmp"
    tmp.write_text(json.dumps(hf_config, indent=1))
    os.replace(tmp, meta / "config.json")
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and (
                f.name.startswith("tokenizer")
                or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")
            ):
                shutil.copy2(f, meta / f.name)
    return meta


def find_model_meta(path) -> Path:
    """The `hf/` meta dir for a checkpoint root or an `iter_*` dir inside it."""
    path = Path(path)
    for cand in (path / META_DIR, path.parent / META_DIR):
        if (cand / "config.json").exists():
            return cand
    raise CheckpointError(f"{path}: no {META_DIR}/config.json next to the checkpoint (was it written by camopd?)")


def resolve_checkpoint(path) -> Path:
    """A checkpoint root (use its latest) or an iter_* dir -> the iter dir to load."""
    path = Path(path)
    if has_manifest(path) or _is_legacy(path):
        return path
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (a file)")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint found (expected iter_*/{MANIFEST})")
    return latest
