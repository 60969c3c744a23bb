"""Two real `serve-teacher` subprocesses; one is killed mid-run: every sample is still scored exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_camopd.remote.discovery import read_discovery_file
from megatron_camopd.teachers.base import TeacherScores
from megatron_camopd.teachers.http import HttpTeacher
from tests.helpers import REPO

from .conftest import direct_logprobs


def start_server(ckpt: Path, ready: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "megatron_camopd.serve.server", "--checkpoint", str(ckpt), "--ready-file", str(ready)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(proc: subprocess.Popen, ready: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        urls = read_discovery_file(str(ready))
        if urls:
            return urls[0]
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    pytest.fail("server did not become ready")


@pytest.fixture()
def replicas(tiny_ckpt, tmp_path):
    procs = [start_server(tiny_ckpt, tmp_path / f"ready{i}") for i in range(2)]
    try:
        urls = [wait_ready(p, tmp_path / f"ready{i}") for i, p in enumerate(procs)]
        yield procs, urls
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def test_replica_killed_mid_run(replicas, scorer):
    procs, urls = replicas
    seqs = {f"k{i}": [1 + i % 50, 2, 3 + (i * 7) % 50, 4, 5, 6 + i % 40] for i in range(120)}

    async def main(teacher: HttpTeacher) -> dict:
        async def items():
            for n, (key, ids) in enumerate(seqs.items()):
                if n == 40:
                    procs[0].kill()  # abrupt death while requests are in flight
                yield key, ids, 2
                await asyncio.sleep(0.002)

        got: dict = {}
        async for key, res in teacher.score_many(items()):
            assert key not in got, f"{key} yielded twice"
            got[key] = res
        return got

    with HttpTeacher("general", urls, max_in_flight=8, backoff_s=0.05, health_interval_s=0.2, seed=3) as teacher:
        got = asyncio.run(main(teacher))
        stats = teacher.replica_stats()
    assert set(got) == set(seqs)
    for key, res in got.items():
        assert isinstance(res, TeacherScores), res
        torch.testing.assert_close(res.logprobs, direct_logprobs(scorer, seqs[key])[1:], atol=1e-5, rtol=1e-5)
    dead, live = stats[urls[0]], stats[urls[1]]
    assert dead.deaths == 1 and not dead.alive and dead.revivals == 0
    assert live.alive and live.deaths == 0 and live.requests > 0
    # graceful shutdown of the survivor on SIGTERM
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(timeout=30) == 0
    assert "stopped" in (procs[1].stdout.read() if procs[1].stdout else "")


def test_a_prompts_samples_go_to_one_replica_while_it_lives() -> None:
    """Replica affinity (the prefix cache of a prompt lives on one server): the same key picks the same replica,
    keys spread over the replicas, a dead replica's keys move to the next live one and the others stay put, and a
    retry's `exclude` is honoured."""
    from megatron_camopd.remote.replicas import ReplicaPool

    urls = [f"http://127.0.0.1:{port}" for port in (1, 2, 3)]
    pool = ReplicaPool("t", urls, health_interval_s=3600)
    try:
        keys = [hash(tuple(range(k, k + 40))) for k in range(60)]
        placed = {k: pool._next_alive(None, k).url for k in keys}
        assert all(pool._next_alive(None, k).url == placed[k] for k in keys)  # stable
        assert set(placed.values()) == set(urls)  # spread
        pool.replicas[urls[1]].alive = False
        moved = {k: pool._next_alive(None, k).url for k in keys}
        assert urls[1] not in moved.values()
        assert all(moved[k] == placed[k] for k in keys if placed[k] != urls[1])
        k = next(k for k in keys if placed[k] == urls[0])
        assert pool._next_alive(urls[0], k).url == urls[2]  # the retry goes elsewhere
    finally:
        pool.close()
