"""Checkpoint manifests: which files a complete checkpoint holds, their sizes and SHA-256 digests.

A checkpoint directory is *complete* only when its `manifest.json` exists. `write_manifest` runs after every
rank has finished writing (a barrier), lists the directory once on rank 0, hashes the files spread over all
ranks (each rank streams its share, balanced by size; on a shared filesystem any rank can read any shard), gathers
the digests and lets rank 0 write the manifest last, atomically (`manifest.json.tmp` + `os.replace`). So for an
8B run the hashing costs one read of each rank's share of the checkpoint (SHA-256 streams at ~1-2 GB/s per core
with SHA-NI), in parallel on every rank, not one rank reading everything.

`verify_manifest` does the same split on load: every listed file must exist with the recorded size and digest;
the first mismatch is a `CheckpointError` naming the file, raised on every rank alike. Both are collective
when torch.distributed is initialised and plain functions otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

from megatron_camopd.errors import CheckpointError

MANIFEST = "manifest.json"
_ALGO = "sha256"


def has_manifest(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _share(sizes: list[int], rank: int, world: int) -> list[int]:
    """Indices of the files this rank hashes: largest first onto the least-loaded rank (deterministic)."""
    load = [0] * world
    mine = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += sizes[i]
        if r == rank:
            mine.append(i)
    return mine


def file_digest(path: Path) -> str:
    """Streamed SHA-256 of one file (hashlib reads it in chunks, never whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, _ALGO).hexdigest()


def _list_files(root: Path) -> list[tuple[str, int]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"):
            out.append((p.relative_to(root).as_posix(), p.stat().st_size))
    return out


def write_manifest(ckpt_dir: str | os.PathLike) -> Path:
    """Collective: hash every file under `ckpt_dir` (all ranks' writes must be complete) and write the manifest."""
    root = Path(ckpt_dir)
    rank, world = _dist()
    if world > 1:
        dist.barrier()
    files = _broadcast(_list_files(root) if rank == 0 else None, rank, world)
    mine = {files[i][0]: file_digest(root / files[i][0]) for i in _share([s for _, s in files], rank, world)}
    digests: dict[str, str] = {}
    for part in _gather(mine, world):
        digests.update(part)
    path = root / MANIFEST
    if rank == 0:
        body = {
            "format": 1,
            "algorithm": _ALGO,
            "files": [{"path": rel, "size": size, _ALGO: digests[rel]} for rel, size in files],
        }
        tmp = root / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if world > 1:
        dist.barrier()
    return path


def read_manifest(ckpt_dir: str | os.PathLike) -> list[dict]:
    """The manifest's file entries; a CheckpointError naming manifest.json when it is missing or malformed."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        algo = body.get("algorithm", _ALGO)
        if algo != _ALGO or not all(
            isinstance(e["path"], str) and isinstance(e["size"], int) and e[_ALGO] for e in files
        ):
            raise ValueError(f"unsupported algorithm {algo!r} or malformed entry")
        return files
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None


def _check_entry(root: Path, entry: dict, with_digest: bool) -> str | None:
    f = root / entry["path"]
    try:
        size = f.stat().st_size
    except OSError as exc:
        return f"{f}: listed in {MANIFEST} but unreadable ({exc.strerror or exc})"
    if size != entry["size"]:
        return f"{f}: size {size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
    if with_digest:
        try:
            digest = file_digest(f)
        except OSError as exc:
            return f"{f}: unreadable ({exc.strerror or exc})"
        if digest != entry[_ALGO]:
            return f"{f}: {_ALGO} {digest[:16]}... differs from the manifest's {entry[_ALGO][:16]}... (corrupted)"
    return None


def verify_manifest(ckpt_dir: str | os.PathLike) -> None:
    """Collective: every file of the manifest exists with its size and digest, else a CheckpointError (all ranks)."""
    root = Path(ckpt_dir)
    rank, world = _dist()
    problem = None
    files = None
    if rank == 0:
        try:
            files = read_manifest(root)
        except CheckpointError as exc:
            problem = str(exc)
    files, problem = _broadcast((files, problem), rank, world)
    if problem is None:
        if rank == 0:  # sizes first, all files: a truncated file is named without hashing anything
            problem = next((p for e in files if (p := _check_entry(root, e, False))), None)
        problem = _broadcast(problem, rank, world)
    if problem is None:
        mine = _share([e["size"] for e in files], rank, world)
        mine_problem = next((p for i in mine if (p := _check_entry(root, files[i], True))), None)
        problem = next((p for p in _gather(mine_problem, world) if p), None)
    if problem:
        raise CheckpointError(problem)
