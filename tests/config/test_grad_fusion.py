"""parallel.gradient_accumulation_fusion and train.overlap_grad_reduce reach megatron-core's configs (issue 29,
defect 9): None is on only where the fused kernels are importable, true is refused where they are not."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest

from megatron_camopd.backend import settings
from megatron_camopd.backend.engine import OptimSettings, ddp_fields
from megatron_camopd.errors import SpecError


def _parallel(v):
    return SimpleNamespace(
        sequence_parallel=False, gradient_accumulation_fusion=v, recompute="none", recompute_modules=None
    )


def test_fusion_refused_without_kernels():
    with mock.patch.object(settings, "grad_accum_fusion_available", return_value=False):
        with pytest.raises(SpecError, match="parallel.gradient_accumulation_fusion"):
            settings.grad_accum_fusion(True)
        assert settings.grad_accum_fusion(None) is False
        assert settings.grad_accum_fusion(False) is False


def test_fusion_on_where_kernels_exist():
    with mock.patch.object(settings, "grad_accum_fusion_available", return_value=True):
        assert settings.grad_accum_fusion(None) is True
        assert settings.grad_accum_fusion(True) is True
        assert settings.grad_accum_fusion(False) is False


def test_fusion_plan_view_takes_kernels_as_present():
    assert settings.grad_accum_fusion(None, check_device=False) is True
    assert settings.grad_accum_fusion(False, check_device=False) is False


def test_cpu_has_no_fusion_kernels():
    assert settings.grad_accum_fusion_available() is False


def test_overlap_reaches_ddp_config():
    assert ddp_fields(OptimSettings(overlap_grad_reduce=True))["overlap_grad_reduce"] is True
    assert ddp_fields(OptimSettings())["overlap_grad_reduce"] is False
