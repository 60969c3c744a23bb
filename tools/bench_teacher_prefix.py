"""Benchmark: what SGLang's prefix cache saves a teacher that scores n samples of one prompt, on a real SGLang
0.5.23 server.

A teacher scores sample i = prompt + response_i. The HTTP teacher asks for log-probs from the response on
(`teachers/protocol.py::score_request`: `logprob_start_len = len(prompt) - 1`), so SGLang may serve the prompt
from its radix cache once another sample of the prompt has been prefilled; asking from position 0
(`logprob_start_len = 0`) makes SGLang prefill every sample whole. Both request sets are sent the way the teacher
client sends them (all samples at once, concurrently), alternately (`--repeats` pairs, a fresh random prompt each
time, so neither finds the other's cache warm and slow drift of a shared machine hits both alike). Printed: the
median wall time of each, their ratio (from-response / from-0), and the prompt tokens SGLang reports as cached
(`meta_info.cached_tokens`). The log-probs of the response tokens must agree between the two (checked).

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


def bench(url: str, vocab: int, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {"from_0": [], "from_response": []}
    cached: dict[str, list[int]] = {"from_0": [], "from_response": []}
    max_diff = 0.0
    for rep in range(args.repeats + 1):  # the first pair warms the server up and is not counted
        order = ["from_0", "from_response"] if rep % 2 == 0 else ["from_response", "from_0"]
        prompts = {k: [rng.randrange(10, vocab) for _ in range(args.prompt_tokens)] for k in order}
        lps: dict[str, list[list[float]]] = {}
        for kind in order:
            prompt = prompts[kind]
            samples = [prompt + [rng.randrange(10, vocab) for _ in range(args.response_tokens)]]
            samples += [
                prompt + [rng.randrange(10, vocab) for _ in range(args.response_tokens)]
                for _ in range(args.samples - 1)
            ]
            start = len(prompt)
            if kind == "from_0":
                bodies = [build_request(ids, None, first=0) for ids in samples]
            else:
                bodies = [score_request(ids, start, None) for ids in samples]
            wall, answers = asyncio.run(_score_all(url, bodies))
            if rep > 0:
                times[kind].append(wall)
                cached[kind].append(sum(int(a["meta_info"].get("cached_tokens", 0)) for a in answers))
            lps[kind] = [_response_lps(a, args.response_tokens) for a in answers]
        # the same request set scored both ways once more, to compare the log-probs themselves
        if rep == 0:
            prompt = prompts["from_0"]
            ids = prompt + [rng.randrange(10, vocab) for _ in range(args.response_tokens)]
            _, (a0,) = asyncio.run(_score_all(url, [build_request(ids, None, first=0)]))
            _, (a1,) = asyncio.run(_score_all(url, [score_request(ids, len(prompt), None)]))
            r0, r1 = _response_lps(a0, args.response_tokens), _response_lps(a1, args.response_tokens)
            max_diff = max(abs(x - y) for x, y in zip(r0, r1))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "from_0_s": med["from_0"],
        "from_response_s": med["from_response"],
        "ratio": med["from_response"] / med["from_0"],
        "cached_from_0": statistics.median(cached["from_0"]),
        "cached_from_response": statistics.median(cached["from_response"]),
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
    print(f"scored from position 0:        {res['from_0_s']:.3f} s  (cached prompt tokens {res['cached_from_0']:.0f})")
    print(
        f"scored from the response on:   {res['from_response_s']:.3f} s  "
        f"(cached prompt tokens {res['cached_from_response']:.0f})"
    )
    print(f"ratio from-response / from-0:  {res['ratio']:.2f}")
    print(f"response log-probs, max |diff| between the two: {res['lp_max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
