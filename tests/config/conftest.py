"""Fixtures for spec tests: a small valid spec text written next to the test's temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO

YAML_DIR = REPO / "yaml"
SPEC_FILES = sorted(YAML_DIR.rglob("*.yaml"))

VALID = """\
name: unit
model:
  hf_path: models/student
  dtype: fp32
teachers:
  general:
    hf_path: models/general
  domain:
    urls: ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
routing:
  general: general
  med: domain
data:
  streams:
    - name: g
      path: data/general.jsonl
      domain: general
      branch: general
    - name: d
      path: data/domain.jsonl
      domain: med
      branch: domain
method:
  name: camopd
  rho_g: 0.8
checkpoint:
  dir: out/ckpt
"""


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write spec text to tmp_path/spec.yaml and return its path."""

    def write(text: str = VALID, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
