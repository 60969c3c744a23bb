"""Benchmark: what SGLang's prefix cache saves a teacher that scores n samples of one prompt, on a real SGLang
0.5.23 server.

A teacher scores sample i = prompt + response_i. The HTTP teacher asks for log-probs from the response on
(`teachers/protocol.py::score_request`: `logprob_start_len = len(prompt) - 1`), so SGLang may serve the prompt
from its radix cache once another sample of the prompt has been prefilled; asking from position 0
(`logprob_start_len = 0`) makes SGLang prefill every sample whole. Both request sets are sent all at once
(concurrently), in turn with a third (`--repeats` rounds, a fresh random prompt each time, so none finds another's
cache warm, and slow drift of a shared machine hits all alike). The third set is scored by the project's
teacher client (`teachers/http.py::HttpTeacher`), which also holds the prompt's other samples back until its
first is answered, so SGLang has the prompt in its radix cache when they arrive (sent all at once, SGLang's
default `fcfs` scheduler puts them in one prefill batch, where none finds it cached). Printed:
the median wall time of each, the ratios to from-0, and the prompt tokens SGLang reports as cached
(`meta_info.cached_tokens`). The log-probs of the response tokens must agree between the ways (checked).

The model defaults to the SmolLM2-135M fixture (`tools/smollm2_fixture.py`, built once into $CAMOPD_CACHE); the
server is started from the project's SGLang environment (`megatron_camopd.launch.sglang_env`) with the CPU
flags of the launchers, and the test-only `sgl_kernel` CPU ops of `tests/sglang_cpu/` on its path.

    python tools/bench_teacher_prefix.py [--model HF_DIR] [--samples 8] [--prompt-tokens 512]
                                         [--response-tokens 32] [--repeats 3] [--url http://host:port]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_camopd.teachers.protocol import build_request, score_request  # noqa: E402


async def _score_all(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as http:

        async def one(body: dict) -> dict:
            async with http.post(f"{url}/generate", json=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"/generate answered {resp.status}: {text[:500]}")
                return await resp.json(content_type=None)

        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, list(answers)


def _response_lps(answer: dict, n_response: int) -> list[float]:
    rows = answer["meta_info"]["input_token_logprobs"]
    return [float(r[0]) for r in rows[-n_response:]]


KINDS = ("from_0", "from_response", "client")


def _client_score(url: str, samples: list[list[int]], start: int) -> tuple[float, list[list[float]], int]:
    """The samples scored by the project's teacher client (one HttpTeacher per request set, as a fresh run)."""
    from megatron_camopd.teachers.http import HttpTeacher

    with HttpTeacher("bench", [url], timeout_s=1800.0) as teacher:
        t0 = time.perf_counter()
        scores = teacher.score_batch(samples, [start] * len(samples))
        wall = time.perf_counter() - t0
        return wall, [s.logprobs.tolist() for s in scores], teacher.prefix_cached_tokens


def bench(url: str, vocab: int, args: argparse.Namespace) -> dict[str, float]:
    """Per kind: `from_0` (every sample asked from position 0, all at once: the client before), `from_response`
    (asked from the response's first position - 1, all at once), `client` (HttpTeacher: from the response on, the
    prompt's first sample alone, then the rest)."""
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    cached: dict[str, list[int]] = {k: [] for k in KINDS}
    max_diff = 0.0
    for rep in range(args.repeats + 1):  # the first round warms the server up and is not counted
        order = list(KINDS[rep % 3 :] + KINDS[: rep % 3])  # each kind first, second and last in turn
        lps: dict[str, list[list[float]]] = {}
        for kind in order:
            prompt = [rng.randrange(10, vocab) for _ in range(args.prompt_tokens)]  # fresh: no warm cache
            responses = [[rng.randrange(10, vocab) for _ in range(args.response_tokens)] for _ in range(args.samples)]
            samples = [prompt + r for r in responses]
            start = len(prompt)
            if kind == "client":
                wall, lps[kind], n_cached = _client_score(url, samples, start)
            else:
                if kind == "from_0":
                    bodies = [build_request(ids, None, first=0) for ids in samples]
                else:
                    bodies = [score_request(ids, start, None) for ids in samples]
                wall, answers = asyncio.run(_score_all(url, bodies))
                n_cached = sum(int(a["meta_info"].get("cached_tokens", 0)) for a in answers)
                lps[kind] = [_response_lps(a, args.response_tokens) for a in answers]
            if rep > 0:
                times[kind].append(wall)
                cached[kind].append(n_cached)
        if rep == 0:  # one sequence scored the three ways: the log-probs must agree
            ids = [rng.randrange(10, vocab) for _ in range(args.prompt_tokens + args.response_tokens)]
            _, (a0,) = asyncio.run(_score_all(url, [build_request(ids, None, first=0)]))
            _, (a1,) = asyncio.run(_score_all(url, [score_request(ids, args.prompt_tokens, None)]))
            _, (c,), _ = _client_score(url, [ids], args.prompt_tokens)
            r0, r1 = _response_lps(a0, args.response_tokens), _response_lps(a1, args.response_tokens)
            max_diff = max(max(abs(x - y), abs(x - z)) for x, y, z in zip(r0, r1, c, strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        **{f"{k}_s": med[k] for k in KINDS},
        **{f"cached_{k}": statistics.median(cached[k]) for k in KINDS},
        "lp_max_abs_diff": max_diff,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF dir (default: the SmolLM2-135M fixture)")
    ap.add_argument("--url", help="an already running SGLang server (else one is started)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--response-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoConfig

    model = args.model
    if model is None:
        from megatron_camopd.convert.fixtures import build_smollm2

        model = str(build_smollm2())
    vocab = int(AutoConfig.from_pretrained(model).vocab_size)
    server = None
    url = args.url
    if url is None:
        from megatron_camopd.config.serving import context_for_inputs
        from megatron_camopd.launch.sglang_env import ensure_sglang_env
        from tests.sglang_servers import KERNEL_STANDIN, launch_sglang, wait_ready

        work = Path(tempfile.mkdtemp(prefix="bench_prefix_"))
        env = {"PYTHONPATH": str(KERNEL_STANDIN), "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
        server = launch_sglang(
            ensure_sglang_env(),
            model,
            work / "sglang.log",
            context_length=context_for_inputs(args.prompt_tokens + args.response_tokens),
            env=env,
        )
        wait_ready([server])
        url = server.url
    try:
        res = bench(url, vocab, args)
    finally:
        if server is not None:
            server.stop()
    print(
        f"nproc {os.cpu_count()}, model {model}, {args.samples} samples x ({args.prompt_tokens} prompt + "
        f"{args.response_tokens} response tokens), {args.repeats} repeats (medians)"
    )
    what = {
        "from_0": "from position 0, all at once",
        "from_response": "from the response on, all at once",
        "client": "the teacher client (HttpTeacher)",
    }
    for k in KINDS:
        print(f"{what[k]:<36} {res[f'{k}_s']:8.3f} s  (prompt tokens served from the cache: {res[f'cached_{k}']:.0f})")
    print(f"ratio from-response / from-0:        {res['from_response_s'] / res['from_0_s']:.2f}")
    print(f"ratio client / from-0:               {res['client_s'] / res['from_0_s']:.2f}")
    print(f"response log-probs, max |diff| between the ways: {res['lp_max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
