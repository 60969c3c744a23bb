"""Strict, typed experiment specs: one dataclass per component, loaded from YAML with overrides.

`load_spec(path, overrides)` returns a validated `ExperimentSpec`; `dump_yaml(spec)` prints it resolved;
`validate_main(argv)` implements `camopd validate`.
"""

from megatron_camopd.checks import FieldError, Section
from megatron_camopd.config.loader import apply_override, build_spec, dump_yaml, load_spec
from megatron_camopd.config.run_sections import (
    CheckpointConfig,
    FP8Config,
    LauncherConfig,
    LoggingConfig,
    ParallelConfig,
    TrainConfig,
    WandbConfig,
)
from megatron_camopd.config.sections import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    RolloutConfig,
    ScheduleConfig,
    StreamConfig,
    TeacherConfig,
)
from megatron_camopd.config.serving import SlurmResources, TeacherServeConfig
from megatron_camopd.config.spec import ExperimentSpec
from megatron_camopd.config.validate import missing_inputs, validate_main

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "ExperimentSpec",
    "FP8Config",
    "FieldError",
    "LauncherConfig",
    "LoggingConfig",
    "MethodConfig",
    "ModelConfig",
    "ParallelConfig",
    "RolloutConfig",
    "ScheduleConfig",
    "Section",
    "SlurmResources",
    "StreamConfig",
    "TeacherConfig",
    "TeacherServeConfig",
    "TrainConfig",
    "WandbConfig",
    "apply_override",
    "build_spec",
    "dump_yaml",
    "load_spec",
    "missing_inputs",
    "validate_main",
]
