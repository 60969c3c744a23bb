"""HttpTeacher against real in-process servers on loopback: values, slicing, limits, failures, discovery."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

from megatron_camopd.errors import TeacherError
from megatron_camopd.serve.server import ServerThread
from megatron_camopd.teachers.base import Teacher, TeacherScores
from megatron_camopd.teachers.http import HttpTeacher
from megatron_camopd.teachers.protocol import build_response, parse_scores

from .conftest import direct_logprobs

SEQS = [[5, 9, 12, 3, 40, 41, 7], [1, 2, 3], [30, 31, 32, 33, 34, 35, 36, 37]]
STARTS = [3, 1, 7]


class SlowScorer:
    """A real scorer that takes `delay` seconds per batch (to observe concurrency)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def score(self, seqs, top_k):
        time.sleep(self.delay)
        return self.inner.score(seqs, top_k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class NaNScorer(SlowScorer):
    """A scorer whose model produced a NaN at position 2 of every sequence."""

    def score(self, seqs, top_k):
        out = self.inner.score(seqs, top_k)
        for s in out:
            s.logprobs[min(1, len(s) - 1)] = float("nan")
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(scorer):
    with ServerThread(scorer, max_wait_ms=2) as srv:
        yield srv


def test_scores_are_the_sliced_direct_computation(server, scorer):
    with HttpTeacher("general", [server.url]) as teacher:
        assert isinstance(teacher, Teacher)
        out = teacher.score_batch(SEQS, STARTS)
        for seq, start, sc in zip(SEQS, STARTS, out):
            assert len(sc) == len(seq) - start and sc.logprobs.dtype == torch.float32
            torch.testing.assert_close(sc.logprobs, direct_logprobs(scorer, seq)[start - 1 :], atol=1e-5, rtol=1e-5)
            assert sc.topk_ids is None
        single = asyncio.run(teacher.score(SEQS[0], STARTS[0], top_k=5))
        assert single.topk_ids.shape == (len(SEQS[0]) - STARTS[0], 5) and single.topk_ids.dtype == torch.long
        assert single.topk_logprobs.shape == single.topk_ids.shape
        assert torch.all(single.topk_logprobs[:, 0] >= single.logprobs - 1e-6)  # top-1 dominates the actual token
        torch.testing.assert_close(single.logprobs, out[0].logprobs)
        empty = teacher.score_batch([[4, 5]], [2])[0]  # an empty response is valid
        assert len(empty) == 0


def test_bad_start_and_refused_request_are_not_retried(server):
    with HttpTeacher("general", [server.url], retries=3) as teacher:
        with pytest.raises(TeacherError, match="start"):
            teacher.score_batch([[1, 2, 3]], [0])
        before = teacher.replica_stats()[server.url].requests
        with pytest.raises(TeacherError, match="refused.*400"):
            asyncio.run(teacher.score([1, 2, 100], 1))
        assert teacher.replica_stats()[server.url].requests == before + 1
        assert teacher.live_urls() == [server.url]


def test_in_flight_is_bounded(scorer):
    with ServerThread(SlowScorer(scorer, 0.03), max_batch=1, max_wait_ms=0) as srv:
        with HttpTeacher("general", [srv.url], max_in_flight=3) as teacher:
            seqs = [[3, 4, 5 + i] for i in range(12)]
            out = teacher.score_batch(seqs, [1] * 12)
            assert len(out) == 12
            assert teacher.max_in_flight_seen == 3
            assert srv.stats.max_in_flight == 3
            assert srv.stats.requests == 12


def test_all_replicas_dead_fails_fast_naming_teacher_and_urls():
    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with HttpTeacher("domain", urls, retries=2, backoff_s=0.01, health_interval_s=0.1, dead_deadline_s=1.0) as t:
        t0 = time.monotonic()
        with pytest.raises(TeacherError) as err:
            t.score_batch([[1, 2, 3]] * 4, [1] * 4)
        assert time.monotonic() - t0 < 8
        msg = str(err.value)
        assert "domain" in msg and urls[0] in msg and urls[1] in msg and "unreachable" in msg
        assert all(r.deaths == 1 and not r.alive for r in t.replica_stats().values())


def test_request_timeout_marks_replica_dead(scorer):
    with ServerThread(SlowScorer(scorer, 0.6), max_batch=1) as srv:
        with HttpTeacher("general", [srv.url], timeout_s=0.1, retries=0, health_interval_s=5, dead_deadline_s=0.2) as t:
            with pytest.raises(TeacherError, match="TimeoutError"):
                t.score_batch([[1, 2, 3]], [1])
            stats = t.replica_stats()[srv.url]
            assert stats.deaths == 1 and not stats.alive


def test_dead_replica_is_revived_by_the_health_probe(scorer):
    srv = ServerThread(scorer)
    port = srv.port
    with HttpTeacher("general", [srv.url], backoff_s=0.05, health_interval_s=0.1, dead_deadline_s=30) as teacher:
        assert len(teacher.score_batch([[1, 2, 3]], [1])) == 1
        srv.stop()
        restarted: list[ServerThread] = []
        timer = threading.Timer(0.6, lambda: restarted.append(ServerThread(scorer, port=port)))
        timer.start()
        try:
            out = teacher.score_batch([[1, 2, 3, 4]], [2])
            assert len(out[0]) == 2
            stats = teacher.replica_stats()[f"http://127.0.0.1:{port}"]
            assert stats.deaths >= 1 and stats.revivals >= 1 and stats.alive
        finally:
            timer.join()
            for s in restarted:
                s.stop()


def test_non_finite_scores_are_detected_and_reported_failed(scorer):
    with ServerThread(NaNScorer(scorer, 0.0)) as srv:
        with HttpTeacher("general", [srv.url], retries=1, backoff_s=0.01) as teacher:
            with pytest.raises(TeacherError, match="non-finite"):
                teacher.score_batch([[1, 2, 3, 4]], [1])
            stats = teacher.replica_stats()[srv.url]
            assert stats.bad_answers == 2 and stats.alive  # answered, so not marked dead


def test_score_many_yields_every_key_once_as_samples_arrive(server, scorer):
    async def main() -> dict:
        queue: asyncio.Queue = asyncio.Queue()
        got: dict = {}
        with HttpTeacher("general", [server.url], max_in_flight=2) as teacher:

            async def produce() -> None:
                for i in range(10):
                    await queue.put((f"s{i}", [2, 3 + i, 4, 5], 2))
                    await asyncio.sleep(0.005)
                await queue.put(("bad", [1, 2], 5))  # invalid start: reported with its key
                await queue.put(None)

            producer = asyncio.create_task(produce())
            async for key, res in teacher.score_many(queue):
                assert key not in got
                got[key] = res
            await producer
        return got

    got = asyncio.run(main())
    assert set(got) == {f"s{i}" for i in range(10)} | {"bad"}
    assert isinstance(got["bad"], TeacherError)
    for i in range(10):
        assert isinstance(got[f"s{i}"], TeacherScores)
        torch.testing.assert_close(
            got[f"s{i}"].logprobs, direct_logprobs(scorer, [2, 3 + i, 4, 5])[1:], atol=1e-5, rtol=1e-5
        )


def test_discovery_file_is_waited_for(server, tmp_path):
    path = tmp_path / "teachers.txt"
    host_port = server.url.removeprefix("http://")

    def write() -> None:
        tmp = tmp_path / "teachers.txt.tmp"
        tmp.write_text(f"# replicas\n{host_port}\n")
        tmp.rename(path)

    timer = threading.Timer(0.3, write)
    timer.start()
    with HttpTeacher("general", discovery_file=str(path), discovery_timeout_s=10) as teacher:
        assert teacher.urls == [server.url]
        teacher.wait_ready(5)
        assert len(teacher.score_batch([[1, 2, 3]], [1])[0]) == 2
    timer.join()
    with pytest.raises(TeacherError, match="does not exist"):
        HttpTeacher("general", discovery_file=str(tmp_path / "never.txt"), discovery_timeout_s=0.3)


def _response(ids, lps):
    return build_response(ids, TeacherScores(torch.tensor(lps)), None, None, "x")


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda o: o["meta_info"]["input_token_logprobs"].pop(), "entries, expected"),
        (lambda o: o["meta_info"]["input_token_logprobs"][2].__setitem__(1, 9), "echoes token id 9"),
        (lambda o: o["meta_info"]["input_token_logprobs"][0].__setitem__(0, -1.0), "entry 0"),
        (lambda o: o["meta_info"]["input_token_logprobs"][1].__setitem__(0, None), "not a number"),
        (lambda o: o["meta_info"]["input_token_logprobs"][1].__setitem__(0, float("-inf")), "non-finite"),
        (lambda o: o.pop("meta_info"), "meta_info"),
    ],
)
def test_protocol_violations_are_teacher_errors(mutate, needle):
    obj = _response([1, 2, 3], [-0.5, -1.5])
    mutate(obj)
    with pytest.raises(TeacherError, match=needle):
        parse_scores(obj, [1, 2, 3], 1, None, "t")


def test_protocol_accepts_null_entry0_and_requires_top_when_asked():
    obj = _response([1, 2, 3], [-0.5, -1.5])
    obj["meta_info"]["input_token_logprobs"][0] = None
    assert parse_scores(obj, [1, 2, 3], 2, None, "t").logprobs.tolist() == [-1.5]
    with pytest.raises(TeacherError, match="input_top_logprobs"):
        parse_scores(obj, [1, 2, 3], 1, 4, "t")
