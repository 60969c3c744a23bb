"""The rollout-engine registry: what `rollout.engine` may name, and everything the rest of the package asks of an
engine by its name. Nothing else in the package tests an engine's name.

An entry (`register_engine`) says
  sampler         "module:Class" of its `Sampler` (rollout/sampler.py), imported only when a run builds it (SGLang's
                  client and megatron-core stay out of `import megatron_camopd`); the class builds itself with
                  `Class.create(model, options)` from an `InProcessModel` and the `EngineOptions`;
  served          True: the student is served by remote servers (a `ServedSampler`: weights synced after every
                  optimizer step, the overlapped pipeline samples through its collective-free `generate_detached`,
                  in-process overlap limits do not apply); False: it decodes in process on the trainer's chunks
                  (the overlapped pipeline samples a snapshot model on a thread);
  servers         served engines: the `rollout` section holding its servers (`rollout.<servers>`): `urls`,
                  `discovery_file` and, for the launchers, `port`, `nodes`, `gpus_per_node`, `resources`; a
                  section with `sync_dir` (and `weight_sync: disk`, when it has the field) gets the default
                  directory `<checkpoint.dir>/weights` of a disk weight sync;
  checks          served engines: "module:function(spec, servers)" of the spec checks of launcher-started servers
                  (context length, parallel layout), run by `ExperimentSpec` before any model loads;
  launch          served engines: "module:function(spec, servers, *, cpu, real) -> launch.servers.Component" of the
                  rollout servers `camopd sbatch` / `camopd launch` start when the section names no urls;
  interleaved_pp  the engine samples with interleaved pipeline chunks (parallel.vpp);
  kv_cache        it holds `rollout.kv_cache_gb` of KV cache on every trainer GPU (`camopd plan`'s memory).

A new engine is one module (its sampler class) and one `register_engine` call: here for the package's engines, or
in the module that defines it (as `tests/train/_plugin_engine.py` does). This module imports nothing heavy: the
config layer reads it while it validates a spec.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineInfo:
    """One registered rollout engine (see the module docstring for each field)."""

    name: str
    sampler: str
    served: bool
    servers: str | None = None
    checks: str | None = None
    launch: str | None = None
    interleaved_pp: bool = True
    kv_cache: bool = False
    summary: str = ""

    @property
    def where(self) -> str:
        """The dotted spec path of its servers section (`rollout.sglang`); '' for in-process engines."""
        return f"rollout.{self.servers}" if self.servers else ""


ENGINES: dict[str, EngineInfo] = {}


def register_engine(
    name: str,
    sampler: str,
    *,
    served: bool,
    servers: str | None = None,
    checks: str | None = None,
    launch: str | None = None,
    interleaved_pp: bool = True,
    kv_cache: bool = False,
    summary: str = "",
) -> EngineInfo:
    """Add an engine under `name` (what `rollout.engine` names); returns its entry. Re-registering the same entry
    is a no-op; a different one under a taken name is refused."""
    for what, ref in (("sampler", sampler), ("checks", checks), ("launch", launch)):
        if ref is not None and (ref.count(":") != 1 or not all(ref.split(":"))):
            raise ValueError(f"engine {name!r}: {what} must be 'module:attribute', got {ref!r}")
    if served and not servers:
        raise ValueError(f"engine {name!r}: a served engine names its servers section (rollout.<servers>)")
    if not served and (servers or checks or launch):
        raise ValueError(f"engine {name!r}: servers, checks and launch are for served engines")
    info = EngineInfo(name, sampler, served, servers, checks, launch, interleaved_pp, kv_cache, summary)
    if not name or ENGINES.get(name, info) != info:
        raise ValueError(f"engine name {name!r} is empty or taken by {ENGINES.get(name)}")
    ENGINES[name] = info
    return info


def unknown_engine(name: str) -> str:
    """The message for an engine name nobody registered (a close match suggested, else the registered names)."""
    close = difflib.get_close_matches(str(name), sorted(ENGINES), n=1)
    hint = f"did you mean {close[0]!r}?" if close else ""
    return f"unknown engine {name!r}; registered engines: {', '.join(sorted(ENGINES))}" + (f"; {hint}" if hint else "")


def engine_info(name: str) -> EngineInfo:
    """The entry of `rollout.engine` (ValueError naming the registered engines otherwise)."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"rollout.engine: {unknown_engine(name)}") from None


def resolve(ref: str) -> Any:
    """Import "module:attribute" and return the attribute."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def names(**where: bool) -> list[str]:
    """The registered engines whose flags match, e.g. `names(served=True)`, sorted."""
    return sorted(n for n, e in ENGINES.items() if all(getattr(e, k) == v for k, v in where.items()))


register_engine(
    "megatron",
    "megatron_camopd.rollout.kv_engine:MegatronSampler",
    served=False,
    interleaved_pp=False,  # megatron-core's inference context has no interleaved pipelining
    kv_cache=True,
    summary="KV-cached decoding on the student's own chunks through megatron-core's inference context",
)
register_engine(
    "sglang",
    "megatron_camopd.rollout.sglang:SglangSampler",
    served=True,
    servers="sglang",
    checks="megatron_camopd.config.spec:check_sglang_servers",
    launch="megatron_camopd.launch.servers:sglang_rollout_component",
    summary="the student served by SGLang rollout servers, weights synced after every optimizer step",
)
register_engine(
    "vllm",
    "megatron_camopd.rollout.vllm:VllmSampler",
    served=True,
    servers="vllm",
    checks="megatron_camopd.config.spec:check_vllm_servers",
    launch="megatron_camopd.launch.servers:vllm_rollout_component",
    summary="the student served by vLLM servers, weights reloaded from disk after every optimizer step",
)
register_engine(
    "reference",
    "megatron_camopd.rollout.reference:ReferenceSampler",
    served=False,
    summary="full recomputation of the prefix per token: slow, exact, the tests' oracle",
)
