"""The CPU runtime keeps megatron-core's CUDA requests on CPU without touching megatron-core."""

from __future__ import annotations

import threading

import pytest
import torch

from megatron_camopd.backend.cpu_runtime import activate_cpu_runtime

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime is inactive with CUDA")


def test_cuda_requests_stay_on_cpu() -> None:
    assert activate_cpu_runtime() and activate_cpu_runtime()  # idempotent
    assert not torch.cuda.is_available()
    assert torch.cuda.current_device() == torch.device("cpu")
    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert t.cuda().device.type == "cpu" and t.to("cuda:0").device.type == "cpu"
    assert t.to(device="cuda", dtype=torch.float16).dtype == torch.float16
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor" and t.half().type() == "torch.cuda.HalfTensor"
    assert t.type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == 0 and torch.cuda.max_memory_allocated() == 0
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event()
    event.record()
    assert event.query()


def test_model_parallel_rng_tracker_runs_on_the_cpu_generator(megatron_world) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_before)  # the fork restores the default state
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    assert torch.equal(a, b)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        c = torch.rand(4)
    assert not torch.equal(b, c)  # the tracked state advances


def test_other_threads_activate_their_own_device_mode() -> None:
    activate_cpu_runtime()
    seen: list[str] = []

    def worker() -> None:
        activate_cpu_runtime()
        seen.append(torch.zeros(1, device="cuda").device.type)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == ["cpu"]


def test_init_distributed_rejects_an_indivisible_layout() -> None:
    from megatron_camopd.backend.cpu_runtime import init_distributed
    from megatron_camopd.errors import SpecError

    with pytest.raises(SpecError, match="not divisible by tp\\*pp"):
        init_distributed(tp=2, pp=1, rank=0, world_size=3)


def test_megatron_ddp_optimizer_step_with_grad_clipping(megatron_world, tiny_hf_dirs) -> None:
    """Real DDP + get_megatron_optimizer + clip_grads (checks grad.type() == 'torch.cuda.FloatTensor')."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ._workers import build_loaded

    _, chunks = build_loaded(tiny_hf_dirs["llama"], tp=1, pp=1)
    model = chunks[0].train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.5), [ddp])
    before = model.decoder.final_layernorm.weight.detach().clone()
    ids = torch.randint(0, 300, (2, 8))
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(ids, torch.arange(8).expand(2, -1), attention_mask=None).logsumexp(-1).mean().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm is not None and torch.isfinite(torch.tensor(grad_norm)) and grad_norm > 0
    assert not torch.equal(model.decoder.final_layernorm.weight.detach(), before)


def _reinit_descriptors(rank: int, world: int) -> list[int]:
    import os

    from megatron_camopd.backend.cpu_runtime import init_distributed

    counts = []
    for tp in (1, 2, 1, 2):  # a running world re-initialised with other layouts, as each in-process run does
        init_distributed(tp, 1)
        counts.append(len(os.listdir("/proc/self/fd")))
    return counts


def test_reinitialising_model_parallel_releases_the_old_groups() -> None:
    from megatron_camopd.backend.spawn import run_on_ranks

    for counts in run_on_ranks(_reinit_descriptors, 2):
        assert counts[2] == counts[0] and counts[3] == counts[1], counts  # no gloo group's pipes left behind
