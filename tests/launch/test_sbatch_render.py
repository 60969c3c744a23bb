"""`camopd sbatch` renders valid, self-contained bash for both topologies, and slurm/ holds the current examples."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.errors import SpecError
from megatron_camopd.launch.sbatch import (
    EXAMPLE_FILES,
    example_scripts,
    render_scripts,
    render_template,
    sbatch_main,
    served_teachers,
)
from megatron_camopd.launch.submit import slurm_minutes

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml"
LAUNCHER = ["launcher.nodes=2", "launcher.gpus_per_node=4", "launcher.teacher_nodes=1", "launcher.teacher_gpus=2",
            "launcher.time=01:00:00", "launcher.partition=gpu", "launcher.env={HF_HOME: /cache}"]


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_hetjob_gpu_script(tmp_path: Path) -> None:
    spec = load_spec(TINY, LAUNCHER)
    assert [t.name for t in served_teachers(spec)] == ["general", "domain"]
    scripts = render_scripts(spec, str(TINY), LAUNCHER, cpu=False, workdir="/work")
    assert list(scripts) == ["hetjob"]
    text = scripts["hetjob"]
    bash_syntax_ok(text, tmp_path)
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch.count("#SBATCH hetjob") == 2  # 2 teacher components + the trainer
    assert sbatch[-1] == "#SBATCH --nodes=2 --ntasks-per-node=1 --time=01:00:00 --gpus-per-node=4 --partition=gpu"
    assert "#SBATCH --nodes=1 --ntasks-per-node=1 --time=01:00:00 --gpus-per-node=2 --partition=gpu" in sbatch
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "TEACHER_BACKEND=sglang", "NODES=2",
                 "NPROC_PER_NODE=4", "TEACHERS=(general domain)", "export HF_HOME=/cache", "WORKDIR=/work",
                 f"SPEC={TINY}"):
        assert line in text.splitlines() or any(l.startswith(line + " ") for l in text.splitlines()), line
    assert "@{" not in text and "serve_one_teacher()" in text  # fully rendered, lib inlined


def test_cpu_script_has_no_gpus_and_serves_with_camopd(tmp_path: Path) -> None:
    spec = load_spec(TINY, LAUNCHER)
    text = render_scripts(spec, str(TINY), LAUNCHER, cpu=True)["hetjob"]
    bash_syntax_ok(text, tmp_path)
    assert "--gpus-per-node" not in text.replace('"--gpus-per-node"', "")
    assert "TEACHER_BACKEND=camopd" in text


def test_dependency_topology_renders_two_scripts(tmp_path: Path) -> None:
    overrides = LAUNCHER + ["launcher.topology=dependency"]
    scripts = render_scripts(load_spec(TINY, overrides), str(TINY), overrides, cpu=False)
    assert list(scripts) == ["teachers", "train"]
    for text in scripts.values():
        bash_syntax_ok(text, tmp_path)
    assert "#SBATCH --nodes=2 " in scripts["teachers"]  # one node per teacher
    assert "TEACHER_JOB_ID=${TEACHER_JOB_ID:?" in scripts["train"]
    assert "hetjob" not in "".join(l for l in scripts["train"].splitlines() if l.startswith("#SBATCH"))


def test_no_served_teachers_gives_a_plain_job(tmp_path: Path) -> None:
    spec = load_spec(TINY, LAUNCHER + ["launcher.teacher_nodes=0"])
    text = render_scripts(spec, str(TINY), [], cpu=True)["hetjob"]
    bash_syntax_ok(text, tmp_path)
    assert "#SBATCH hetjob" not in text and "TEACHERS=()" in text


def test_cli_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.sbatch"
    assert sbatch_main([str(TINY), *LAUNCHER, "launcher.topology=dependency", "-o", str(out), "--cpu"]) == 0
    assert (tmp_path / "run_teachers.sbatch").is_file() and (tmp_path / "run_train.sbatch").is_file()
    assert sbatch_main([str(TINY), *LAUNCHER]) == 0
    assert capsys.readouterr().out.count("#!/bin/bash") == 1


def test_slurm_examples_are_current(tmp_path: Path) -> None:
    for name, text in example_scripts().items():
        bash_syntax_ok(text, tmp_path)
        path = REPO / "slurm" / name
        assert path.read_text() == text, f"{path} is stale: regenerate from megatron_camopd/launch/templates"
    assert set(EXAMPLE_FILES.values()) <= {p.name for p in (REPO / "slurm").iterdir()}


def test_missing_template_value_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"needs a value for @\{LOG_DIR\}"):
        render_template("hetjob", {})


@pytest.mark.parametrize(("text", "minutes"), [("30", 30), ("01:30", 2), ("08:00:00", 480), ("1-00:00:00", 1440),
                                               ("2-1", 2940)])
def test_slurm_minutes(text: str, minutes: int) -> None:
    assert slurm_minutes(text) == minutes
