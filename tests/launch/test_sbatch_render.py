"""`camopd sbatch` renders valid bash for both topologies, and slurm/ holds the current examples."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.errors import SpecError
from megatron_camopd.launch.protocol import LIB_SH
from megatron_camopd.launch.sbatch import (
    EXAMPLE_FILES,
    example_scripts,
    render_scripts,
    render_template,
    sbatch_main,
)
from megatron_camopd.launch.servers import server_components
from megatron_camopd.launch.submit import slurm_minutes
from tests.helpers import REPO

TINY = REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml"
SERVE = "{nodes: 1, gpus_per_node: 2, tp: 1, dp: 2}"
LAUNCHER = [
    "launcher.nodes=2",
    "launcher.gpus_per_node=4",
    f"teachers.general.serve={SERVE}",
    f"teachers.domain.serve={SERVE}",
    "launcher.time=01:00:00",
    "launcher.partition=gpu",
    "launcher.env={HF_HOME: /cache}",
]


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_hetjob_gpu_script(tmp_path: Path) -> None:
    spec = load_spec(TINY, LAUNCHER)
    assert [c.name for c in server_components(spec, cpu=False)] == ["general", "domain"]
    scripts = render_scripts(spec, str(TINY), LAUNCHER, cpu=False, workdir="/work")
    assert list(scripts) == ["hetjob"]
    text = scripts["hetjob"]
    bash_syntax_ok(text, tmp_path)
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch.count("#SBATCH hetjob") == 2  # 2 teacher components + the trainer
    assert sbatch[-1] == (
        "#SBATCH --nodes=2 --ntasks-per-node=1 --time=01:00:00 --gpus-per-node=4 --exclusive --mem=0 --partition=gpu"
    )
    assert (
        "#SBATCH --nodes=1 --ntasks-per-node=1 --time=01:00:00 --gpus-per-node=2 --exclusive --mem=0 --partition=gpu"
    ) in sbatch
    for line in (
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@1800",
        "SERVER_BACKEND=sglang",
        "NODES=2",
        "NPROC_PER_NODE=4",
        "SERVERS=(general domain)",
        "export HF_HOME=/cache",
        "WORKDIR=/work",
        f"SPEC={TINY}",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
    ):
        assert line in text.splitlines() or any(x.startswith(line + " ") for x in text.splitlines()), line
    assert "@{" not in text and 'source "$CAMOPD_LIB"' in text  # fully rendered, sources the package's lib.sh
    lib = LIB_SH.read_text()
    assert "--shutdown-timeout=" not in lib and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT_S" in lib


def test_cpu_script_has_no_gpus_and_serves_with_camopd(tmp_path: Path) -> None:
    spec = load_spec(TINY, LAUNCHER)
    text = render_scripts(spec, str(TINY), LAUNCHER, cpu=True, backend="camopd")["hetjob"]
    bash_syntax_ok(text, tmp_path)
    assert "--gpus-per-node" not in text.replace('"--gpus-per-node"', "")
    assert "SERVER_BACKEND=camopd" in text and "serve-teacher --checkpoint" in text


def test_cpu_script_serves_real_sglang_with_its_cpu_flags(tmp_path: Path) -> None:
    """The CPU render of the SGLang backend: the cluster's SGLang command line from SGLang's own python, plus the
    CPU flags and SGLANG_USE_CPU_ENGINE; no GPUs, no --enable-deterministic-inference (not offered on a CPU)."""
    over = [*LAUNCHER, "launcher.sglang_python=/envs/sglang/bin/python", "rollout.engine=sglang"]
    spec = load_spec(TINY, over)
    text = render_scripts(spec, str(TINY), over, cpu=True)["hetjob"]
    bash_syntax_ok(text, tmp_path)
    assert "SERVER_BACKEND=sglang" in text and "SGLANG_PYTHON=/envs/sglang/bin/python" in text
    assert '"$SGLANG_PYTHON" -m sglang.launch_server' in text
    assert "--device cpu" in text and "--attention-backend torch_native" in text and "SGLANG_USE_CPU_ENGINE=1" in text
    assert "--gpus-per-node" not in text.replace('"--gpus-per-node"', "")
    assert "--enable-deterministic-inference" not in text and "--base-gpu-id" not in text


def test_rollout_servers_several_per_node_with_their_own_gpus_ports_and_seeds(tmp_path: Path) -> None:
    """`rollout.sglang.servers_per_node`: each node's task starts that many servers, server i on GPUs from
    i * tp * dp (--base-gpu-id "$4") and port + i; the group waits for nodes x servers_per_node healthy servers;
    rollout servers get --enable-deterministic-inference (sampling_seed is honoured only with it) unless turned
    off; a teacher's context is the sequence length + 7 (SGLang 0.5.23's input bound) and its log-prob chunk
    variables are 0.5.23's."""
    over = [
        *LAUNCHER,
        "rollout.engine=sglang",
        "rollout.sglang.nodes=2",
        "rollout.sglang.gpus_per_node=8",
        "rollout.sglang.tp=2",
        "rollout.sglang.servers_per_node=4",
    ]
    spec = load_spec(TINY, over)
    (rollout,) = [c for c in server_components(spec, cpu=False) if c.kind == "rollout"]
    assert (rollout.per_node, rollout.gpus_per_server, rollout.count) == (4, 2, 8)
    text = render_scripts(spec, str(TINY), over, cpu=False)["hetjob"]
    bash_syntax_ok(text, tmp_path)
    assert '--base-gpu-id "$4"' in text and "--enable-deterministic-inference" in text
    assert f"--context-length {spec.seq_length + 7}" in text
    assert "SGLANG_ENABLE_LOGPROB_CHUNK=1" in text and "SGLANG_LOGPROB_CHUNK_SIZE=" in text
    assert "LOGITS_PROCESSER" not in text
    (start,) = [line for line in text.splitlines() if line.startswith("start_servers 2 ")]
    assert shlex.split(start)[7:9] == ["4", "2"]  # per node, GPUs per server
    assert "SERVER_COUNTS=(1 1 8)" in text
    off = load_spec(TINY, [*over, "rollout.sglang.deterministic_inference=false"])
    assert "--enable-deterministic-inference" not in render_scripts(off, str(TINY), over, cpu=False)["hetjob"]


def test_dependency_topology_renders_two_scripts(tmp_path: Path) -> None:
    overrides = LAUNCHER + ["launcher.topology=dependency"]
    scripts = render_scripts(load_spec(TINY, overrides), str(TINY), overrides, cpu=False)
    assert list(scripts) == ["teachers", "train"]
    for text in scripts.values():
        bash_syntax_ok(text, tmp_path)
    servers = [line for line in scripts["teachers"].splitlines() if line.startswith("#SBATCH --nodes=")]
    assert len(servers) == 2 and "#SBATCH hetjob" in scripts["teachers"]  # one component per teacher
    assert "TEACHER_JOB_ID=${TEACHER_JOB_ID:?" in scripts["train"]
    assert "hetjob" not in "".join(x for x in scripts["train"].splitlines() if x.startswith("#SBATCH"))


def test_no_served_teachers_gives_a_plain_job(tmp_path: Path) -> None:
    spec = load_spec(TINY, ["launcher.nodes=1", "launcher.gpus_per_node=1"])
    text = render_scripts(spec, str(TINY), [], cpu=True)["hetjob"]
    bash_syntax_ok(text, tmp_path)
    assert "#SBATCH hetjob" not in text and "SERVERS=()" in text


def test_cli_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.sbatch"
    argv = [str(TINY), *LAUNCHER, "launcher.topology=dependency", "-o", str(out), "--cpu", "--server-backend", "camopd"]
    assert sbatch_main(argv) == 0
    assert (tmp_path / "run_teachers.sbatch").is_file() and (tmp_path / "run_train.sbatch").is_file()
    assert sbatch_main([str(TINY), *LAUNCHER]) == 0
    assert capsys.readouterr().out.count("#!/bin/bash") == 1


def test_slurm_examples_are_current(tmp_path: Path) -> None:
    for name, text in example_scripts().items():
        bash_syntax_ok(text, tmp_path)
        path = REPO / "slurm" / name
        assert path.read_text() == text, f"{path} is stale: run python tools/render_slurm.py"
    assert set(EXAMPLE_FILES.values()) <= {p.name for p in (REPO / "slurm").iterdir()}


def test_missing_template_value_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"needs a value for @\{LOG_DIR\}"):
        render_template("hetjob", {})


@pytest.mark.parametrize(
    ("text", "minutes"), [("30", 30), ("01:30", 2), ("08:00:00", 480), ("1-00:00:00", 1440), ("2-1", 2940)]
)
def test_slurm_minutes(text: str, minutes: int) -> None:
    assert slurm_minutes(text) == minutes
