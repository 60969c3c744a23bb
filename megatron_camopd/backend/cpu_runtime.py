"""CPU runtime for real megatron-core, plus torch.distributed / model-parallel set-up helpers.

megatron-core assumes CUDA: it allocates with ``device=torch.cuda.current_device()``, calls ``.cuda()``,
keeps its model-parallel RNG states on the CUDA generator, checks ``grad.type() == 'torch.cuda.FloatTensor'``
in ``clip_grads`` and synchronises / records CUDA streams and events. On a machine without CUDA,
``activate_cpu_runtime()`` adapts only that CUDA surface of torch (never megatron-core itself) so the
unmodified library runs on CPU over gloo:

* a ``TorchFunctionMode`` rewrites ``device="cuda"`` / ``cuda:N`` / integer devices to CPU in every torch call
  (factories, ``Tensor.to``), turns ``Tensor.cuda()`` into a no-op, drops ``pin_memory`` and makes
  ``Tensor.type()`` report ``torch.cuda.*Tensor`` names;
* custom autograd Functions' backward runs under that mode too (activation recomputation re-runs forward code
  inside the autograd engine, where the mode would otherwise be inactive);
* ``torch.cuda.current_device`` returns ``torch.device("cpu")``; ``torch.cuda.is_available`` stays False;
* the model-parallel RNG tracker runs on the CPU default generator;
* ``synchronize``/``empty_cache``/``set_device`` are no-ops, memory statistics return 0, and streams/events are
  inert stand-ins (needed by megatron-core 0.17+).

When CUDA is available the function does nothing. Function modes are thread-local in torch, so a thread
other than the main one that runs megatron-core code calls ``activate_cpu_runtime()`` itself. ``init_distributed`` /
``destroy_distributed`` start and stop
torch.distributed (gloo on CPU, nccl on GPU) and megatron's ``parallel_state``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_PATCHED = False
_THREAD_STATE = threading.local()  # torch function modes are thread-local

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int16: "torch.cuda.ShortTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:N", torch.device("cuda", N) and bare integer device indices."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """Keeps every tensor on CPU while megatron-core asks for CUDA ones."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to("cpu", non_blocking=bool(kwargs.get("non_blocking", False)))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype) or func(*args)
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        if kwargs and (_is_cuda_device(kwargs.get("device")) or kwargs.get("pin_memory")):
            kwargs = dict(kwargs)
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = torch.device("cpu")
            kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


def _with_cpu_mode(apply: Callable) -> Callable:
    """Wrap a custom autograd Function's backward entry so it runs under the CPU mode. The autograd engine is
    entered from the mode's own handler (``torch.autograd.backward`` is a torch function), where the mode is
    inactive; a backward that re-runs forward code (activation recomputation: megatron-core's
    ``CheckpointFunction``, ``CheckpointWithoutOutput``) would otherwise allocate on "cuda"."""

    def wrapped(self: Any, *args: Any) -> Any:
        if torch._C._len_torch_function_stack() > 0:  # a mode is active (e.g. a direct grad_fn.apply call)
            return apply(self, *args)
        with _CpuDeviceMode():
            return apply(self, *args)

    wrapped._camopd_cpu = True  # type: ignore[attr-defined]  # marker attribute on the function object
    return wrapped


class _FakeEvent:
    """Inert ``torch.cuda.Event``: CPU work is synchronous, so every event is complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _FakeStream:
    """Inert ``torch.cuda.Stream``: usable as a context manager, waits and records do nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = torch.device("cpu")

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _FakeEvent:
        return event if event is not None else _FakeEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _FakeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_DEFAULT_STREAM = _FakeStream()


def _zero_fn() -> Callable[..., int]:
    # A distinct function object per patched name: torch._dynamo's trace rules reject one object under two names.
    def zero(*args: Any, **kwargs: Any) -> int:
        return 0

    return zero


def _noop_fn() -> Callable[..., None]:
    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    return noop


def _null_context_fn() -> Callable[..., contextlib.AbstractContextManager]:
    def null_context(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    return null_context


def _patch_cuda_namespace() -> None:
    cuda: Any = torch.cuda  # patched attribute by attribute (torch's stubs type the real functions)
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = _noop_fn()
    cuda.synchronize = _noop_fn()
    cuda.empty_cache = _noop_fn()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, _zero_fn())
    cuda.reset_peak_memory_stats = _noop_fn()
    cuda.reset_max_memory_allocated = _noop_fn()
    cuda.memory_stats = lambda *a, **k: {}
    cuda.mem_get_info = lambda *a, **k: (0, 0)
    cuda.Stream = _FakeStream
    cuda.ExternalStream = _FakeStream
    cuda.Event = _FakeEvent
    cuda.current_stream = lambda *a, **k: _DEFAULT_STREAM
    cuda.default_stream = lambda *a, **k: _DEFAULT_STREAM
    cuda.stream = _null_context_fn()
    cuda.set_stream = _noop_fn()
    cuda.nvtx.range_push = _noop_fn()
    cuda.nvtx.range_pop = _noop_fn()
    cuda.nvtx.range = _null_context_fn()

    # RNG: the CUDA generator becomes the CPU default generator.
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.default_generator.get_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.default_generator.set_state(new_state)

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    cuda.get_rng_state = get_rng_state
    cuda.set_rng_state = set_rng_state
    cuda.manual_seed = manual_seed
    cuda.random.get_rng_state = get_rng_state
    cuda.random.set_rng_state = set_rng_state
    cuda.random.manual_seed = manual_seed


def _patch_megatron_rng() -> None:
    """Point megatron's private CUDA-RNG accessors at the CPU generator (no change to megatron's logic)."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # megatron-core not installed: nothing to adapt
        return

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.default_generator.get_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.default_generator.set_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state

    class _DropCpuRngWarning(logging.Filter):
        # On CPU the "CUDA" generator IS the CPU generator, so this warning fires on every fork.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())


def _patch_autograd_backward() -> None:
    from torch.autograd.function import BackwardCFunction

    for name in ("apply", "apply_boxed"):
        fn = getattr(BackwardCFunction, name, None)
        if fn is not None and not getattr(fn, "_camopd_cpu", False):
            setattr(BackwardCFunction, name, _with_cpu_mode(fn))


def cpu_runtime_active() -> bool:
    """True once ``activate_cpu_runtime`` adapted torch for CPU-only execution (in any thread)."""
    return _PATCHED


def activate_cpu_runtime() -> bool:
    """Adapt torch's CUDA surface so megatron-core runs on CPU. Idempotent; a no-op when CUDA is available.

    The ``torch.cuda`` patches are process-wide, but torch keeps function modes per thread: call this again in
    every other thread that runs megatron-core code (e.g. an executor thread serving a model); it is cheap.
    Returns True when the CPU runtime is (now) active, False when CUDA is used instead.
    """
    global _PATCHED
    if not _PATCHED:
        if torch.cuda.is_available():
            return False
        try:  # import first: megatron's import runs torch.compile, whose trace rules must see the real torch.cuda
            import megatron.core  # noqa: F401
        except ImportError:
            pass
        _patch_cuda_namespace()
        _patch_megatron_rng()
        _patch_autograd_backward()
        _PATCHED = True
    if getattr(_THREAD_STATE, "mode", None) is None:
        mode = _CpuDeviceMode()
        mode.__enter__()  # stays active for the life of this thread
        _THREAD_STATE.mode = mode
    return True


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    backend: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int | None = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Start torch.distributed and megatron's model-parallel groups.

    Rank/world size come from the arguments or the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); a single process without that environment runs as a world of 1. The backend defaults to
    nccl with CUDA and gloo (after ``activate_cpu_runtime``) without. DP = world / (tp * pp). With ``seed`` the
    model-parallel RNG tracker is seeded (``model_parallel_cuda_manual_seed``), as GPTModel construction needs.
    """
    from megatron.core import parallel_state, tensor_parallel

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        activate_cpu_runtime()
    backend = backend or ("nccl" if on_gpu else "gloo")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size % (tp * pp) != 0:
        from megatron_camopd.errors import SpecError

        raise SpecError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    if not torch.distributed.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world_size == 1:
            # A world of one needs no rendezvous: an in-memory store opens no port, so an inherited or busy
            # MASTER_PORT (a parent process's, a test runner's) can never collide with it.
            torch.distributed.init_process_group(
                backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                raise RuntimeError("MASTER_PORT must be set for a multi-process run")
            torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        _destroy_subgroups()
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=timeout_minutes,
    )
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _destroy_subgroups() -> None:
    """Collective: destroy every process group but the default one. megatron-core's destroy_model_parallel only
    forgets its groups, and each forgotten gloo group keeps its pipes and threads (~70 descriptors per
    re-initialisation) for the life of the process: a process that trains or converts several times in one world
    (the demo's phases, `camopd compare`, in-process conversions) would run out of file descriptors."""
    from torch.distributed import distributed_c10d as c10d

    default = c10d._get_default_group()
    for group in list(c10d._world.pg_map):
        if group is not default:
            torch.distributed.destroy_process_group(group)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group (safe to call twice)."""
    import sys

    if "megatron.core" in sys.modules:  # do not pay megatron's import just to tear down
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
