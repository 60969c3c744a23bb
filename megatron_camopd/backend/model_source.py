"""Where a model's weights and architecture come from: a HuggingFace directory or a checkpoint of this project.

`ModelSource.resolve` checks the spec's `hf_path` / `checkpoint` before any model loads (a missing config.json is
a `SpecError` naming the field); `load_into` fills Megatron model chunks from it at this rank's TP/PP position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron.core import parallel_state as ps

from megatron_camopd.backend.checkpoint import find_model_meta, load_model_only, resolve_checkpoint
from megatron_camopd.backend.hf_mapping import load_hf_weights
from megatron_camopd.backend.model import ModelArch
from megatron_camopd.errors import SpecError


@dataclass
class ModelSource:
    """Where a model's weights and architecture come from: a HF dir or a checkpoint of this project."""

    hf_dir: Path | None
    checkpoint: Path | None
    config_dir: Path  # holds config.json (+ tokenizer files)

    @classmethod
    def resolve(cls, hf_path: str | None, checkpoint: str | None, field_name: str) -> ModelSource:
        if checkpoint:
            return cls(None, resolve_checkpoint(checkpoint), find_model_meta(checkpoint))
        if hf_path:
            p = Path(hf_path)
            if not (p / "config.json").exists():
                hint = " (the tiny example's models are made by `camopd tiny`)" if "tiny" in str(p) else ""
                raise SpecError(f"{field_name}.hf_path: {p} has no config.json{hint}")
            return cls(p, None, p)
        raise SpecError(f"{field_name}: give hf_path or checkpoint")

    def hf_config(self) -> dict:
        return json.loads((self.config_dir / "config.json").read_text())

    def arch(self) -> ModelArch:
        return ModelArch.from_hf_config(self.hf_config(), source=str(self.config_dir / "config.json"))

    def load_into(self, chunks: list, arch: ModelArch) -> None:
        if self.checkpoint is not None:
            load_model_only(self.checkpoint, chunks)
        else:
            assert self.hf_dir is not None, "a model source has an HF dir or a checkpoint"
            load_hf_weights(
                chunks,
                self.hf_dir,
                arch,
                ps.get_tensor_model_parallel_rank(),
                ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_rank(),
                ps.get_pipeline_model_parallel_world_size(),
            )
