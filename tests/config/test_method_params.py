"""A method owns its parameters: one section next to its maths, loaded from `method.<key>` through the registry.

The plug-in method of tests/train/_plugin_method.py (its parameters and class in one file, plus a registry entry)
is registered into a copy of the registry here, so the spec's `method` section grows `method.half_gap.factor` for
these tests only.
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle

import pytest

from megatron_camopd.algo import methods
from megatron_camopd.algo.camopd import CaMOPDParams
from megatron_camopd.algo.params import LossParams, MethodParams
from megatron_camopd.config import dump_yaml, load_spec
from megatron_camopd.errors import SpecError

from .conftest import VALID
from .test_errors import error_of, line_of


@pytest.fixture
def plugin(monkeypatch):
    """`half_gap` registered into a copy of the registry (the package's own is restored afterwards)."""
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    mod = importlib.import_module("tests.train._plugin_method")
    methods.register_method(mod.HalfGap, mod.HalfGapParams)  # a no-op when the import just registered it
    return mod


HALF_GAP = VALID.replace("  name: camopd\n  rho_g: 0.8\n", "  name: half_gap\n  half_gap:\n    factor: 0.25\n").replace(
    "checkpoint:", "schedule:\n  mix_ratio: [1, 1]\ncheckpoint:"
)


def test_a_plugin_method_s_parameters_load_dump_and_reach_it(plugin, write_spec) -> None:
    spec = load_spec(write_spec(HALF_GAP))
    assert isinstance(spec.method.half_gap, plugin.HalfGapParams) and spec.method.half_gap.factor == 0.25
    built = methods.spec_method(spec)
    assert isinstance(built, plugin.HalfGap) and built.factor == 0.25 and built.a_max == spec.method.a_max
    text = dump_yaml(spec)
    assert "  exopd:\n    lam: 1.25\n    reference: null\n  half_gap:\n    factor: 0.25\nschedule:" in text
    assert dump_yaml(load_spec(write_spec(text, "again.yaml"))) == text
    assert load_spec(write_spec(HALF_GAP), ["method.half_gap.factor=2"]).method.half_gap.factor == 2.0


def test_a_plugin_method_s_bad_parameter_names_field_file_and_line(plugin, write_spec) -> None:
    bad = HALF_GAP.replace("factor: 0.25", "factor: 0")
    assert (
        error_of(write_spec, bad)
        == f"{write_spec(bad)}:{line_of(bad, 'factor')}: method.half_gap.factor: must be > 0, got 0.0"
    )
    assert "method.half_gap.factr: unknown key; did you mean 'factor'?" in error_of(
        write_spec, HALF_GAP.replace("factor:", "factr:")
    )
    with pytest.raises(SpecError, match="^factor: must be > 0, got -1.0$"):
        methods.build_method("half_gap", factor=-1.0)


def test_without_the_plugin_the_method_section_has_no_key_of_it(write_spec) -> None:
    assert "method.half_gap: unknown key" in error_of(write_spec, HALF_GAP)
    assert "half_gap" not in dump_yaml(load_spec(write_spec()))


def test_camopd_parameters_stay_flat_and_spec_access_names_each_method_s(write_spec) -> None:
    spec = load_spec(write_spec(VALID.replace("  rho_g: 0.8\n", "  rho_g: 0.6\n  selection_order: random\n")))
    camopd = spec.method.camopd
    assert isinstance(camopd, CaMOPDParams) and (camopd.rho_g, camopd.selection, camopd.selection_order) == (
        0.6,
        True,
        "random",
    )
    assert spec.method.shared == LossParams()
    assert spec.method.uniopd.delta_star == 0.4 and spec.method.relaxed.lam == 0.2 and spec.method.exopd.lam == 1.25
    built = methods.spec_method(spec)
    assert (built.rho_g, built.selection_order, built.seed) == (0.6, "random", spec.train.seed)
    mopd = load_spec(write_spec(VALID), ["method.name=mopd", "schedule.mix_ratio=[1, 1]"])
    assert mopd.method.selection is False  # the selected method's default_selection
    with pytest.raises(AttributeError):
        spec.method.nope  # noqa: B018


def test_the_method_section_pickles_and_copies_by_value(write_spec) -> None:
    spec = load_spec(write_spec())
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and type(again.method) is type(spec.method)
    assert dataclasses.replace(spec.method, rho_g=0.5).rho_g == 0.5


def test_registering_refuses_clashing_keys_and_parameters_without_defaults(monkeypatch) -> None:
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))

    @dataclasses.dataclass
    class Rho(MethodParams):
        rho_g: float = 0.5

    @dataclasses.dataclass
    class Needy(MethodParams):
        x: float

    def method_of(params: type, name: str) -> type:
        return dataclasses.dataclass(type(name, (methods.Method, params), {"__annotations__": {}, "name": name}))

    with pytest.raises(ValueError, match=r"`method.rho_g` is already a spec key"):
        methods.register_method(method_of(Rho, "flat_rho"), Rho, flat=True)
    with pytest.raises(ValueError, match=r"`method.uniopd` is already a spec key"):
        methods.register_method(method_of(Rho, "other"), Rho, key="uniopd")
    with pytest.raises(ValueError, match=r"`method.topk` is already a spec key"):
        methods.register_method(method_of(Rho, "topk"), Rho)
    with pytest.raises(ValueError, match="parameter 'x' needs a default"):
        methods.register_method(method_of(Needy, "needy"), Needy)
    with pytest.raises(ValueError, match="must derive from its parameters"):
        methods.register_method(methods.OPD, Rho, key="rho")
    assert set(methods.METHODS) == {"opd", "mopd", "camopd", "uniopd", "relaxed_opd", "selectkd", "exopd", "sft"}
