"""Rollout engines come from the registry (engines.py) alone: a served engine other than sglang, registered
here, gets the served treatment from its entry (its servers section checked and launched, in-process overlap
limits lifted, the disk-sync directory defaulted, the pipeline's methods required of its sampler); an engine nobody
registered is refused naming the field, the file:line and the registered engines; malformed entries are refused.
(An in-process engine added in one file trains end to end: tests/train/test_plugin_engine.py.)"""

from __future__ import annotations

import pytest

from megatron_camopd.checks import check
from megatron_camopd.config import load_spec
from megatron_camopd.engines import ENGINES, register_engine
from megatron_camopd.errors import SpecError
from megatron_camopd.launch.servers import Component, server_components
from megatron_camopd.rollout.sampler import build_sampler
from tests.helpers import REPO

TINY_SPEC = REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml"
FLAGSHIP = REPO / "yaml" / "camopd_medical_qwen3_8b.yaml"  # tp=2, pp=2, fp8, a launcher, rollout.sglang servers


def test_an_unregistered_engine_is_refused_naming_field_line_and_engines(tmp_path):
    text = TINY_SPEC.read_text().replace("rollout:\n", "rollout:\n  engine: counting_reference\n")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path, [])
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "engine: counting_reference" in s)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: rollout.engine: unknown engine 'counting_reference'")
    assert {"megatron", "reference", "sglang"} <= set(ENGINES)
    assert f"registered engines: {', '.join(sorted(ENGINES))}" in msg
    with pytest.raises(SpecError, match="rollout.engine: unknown engine 'sglan'.*did you mean 'sglang'"):
        load_spec(TINY_SPEC, ["rollout.engine=sglan"])


class _Incomplete:
    """A served engine's sampler without the pipeline's methods (generate_detached, share, ...)."""

    engine = "toy_served"

    @classmethod
    def create(cls, model, options):
        return cls()

    def generate(self, prompts, params, seeds, on_finish=None):
        return []

    def update_weights(self, step):
        return {}

    def close(self):
        pass


def _toy_checks(spec, servers) -> None:
    check(servers.tp == 1, "rollout.sglang.tp", f"toy servers run on one GPU, got tp = {servers.tp}")


def _toy_launch(spec, servers, *, cpu: bool, real: bool) -> Component:
    return Component("rollout", "rollout", servers.nodes, servers.gpus_per_node, servers.resources, port=servers.port)


@pytest.fixture
def toy_served():
    """A served engine other than sglang (its servers in `rollout.sglang`), registered for one test."""
    info = register_engine(
        "toy_served",
        f"{__name__}:_Incomplete",
        served=True,
        servers="sglang",
        checks=f"{__name__}:_toy_checks",
        launch=f"{__name__}:_toy_launch",
    )
    yield info
    del ENGINES["toy_served"]


def test_a_served_engine_takes_its_treatment_from_the_registry(toy_served):
    base = ["rollout.engine=toy_served", "rollout.max_staleness=1"]
    # served: tp=2, pp=2 and fp8 overlap (the in-process engines are refused just that)
    spec = load_spec(FLAGSHIP, base)
    assert spec.rollout_engine is toy_served and spec.rollout_servers is spec.rollout.sglang
    with pytest.raises(SpecError, match="rollout.max_staleness: overlapping in-process rollouts.*toy_served"):
        load_spec(FLAGSHIP, ["rollout.engine=reference", "rollout.max_staleness=1"])
    # its launcher-started servers: its own checks, its own component
    with pytest.raises(SpecError, match="rollout.sglang.tp: toy servers run on one GPU, got tp = 2"):
        load_spec(FLAGSHIP, [*base, "rollout.sglang.tp=2"])
    rollout = [c for c in server_components(spec, cpu=False) if c.kind == "rollout"]
    assert rollout == [_toy_launch(spec, spec.rollout.sglang, cpu=False, real=True)]
    assert spec.rollout.sglang.sync_dir is None  # distributed sync: no directory
    disk = load_spec(FLAGSHIP, [*base, "rollout.sglang.weight_sync=disk"])
    assert disk.rollout.sglang.sync_dir == f"{disk.checkpoint.dir.rstrip('/')}/weights"
    # without a launcher the servers must be named, at the engine's section
    with pytest.raises(SpecError, match="rollout.sglang: engine toy_served needs urls or discovery_file"):
        load_spec(FLAGSHIP, [*base, "launcher=null"])
    # a served engine's sampler must offer the overlapped pipeline's methods
    with pytest.raises(TypeError, match="served but .*_Incomplete is no ServedSampler"):
        build_sampler("toy_served", None)  # type: ignore[arg-type]


def test_the_registry_refuses_malformed_entries():
    with pytest.raises(ValueError, match="'module:attribute'"):
        register_engine("bad", "no_colon", served=False)
    with pytest.raises(ValueError, match="names its servers section"):
        register_engine("bad", "m:C", served=True)
    with pytest.raises(ValueError, match="for served engines"):
        register_engine("bad", "m:C", served=False, servers="sglang")
    with pytest.raises(ValueError, match="taken by"):
        register_engine("sglang", "m:C", served=False)
    assert "bad" not in ENGINES
