"""Every cluster spec in yaml/ renders a script that serves each HTTP teacher with its model, waits for it before
training, and requests its resources (GPUs, CPUs, memory, whole nodes) for every component."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.launch.protocol import LIB_SH
from megatron_camopd.launch.sbatch import render_scripts
from megatron_camopd.launch.servers import server_components
from tests.helpers import REPO

CLUSTER_SPECS = sorted(p for p in (REPO / "yaml").rglob("*.yaml") if "examples" not in p.parts)


def component_requests(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH --nodes=")]


@pytest.mark.parametrize("path", CLUSTER_SPECS, ids=lambda p: p.name)
def test_cluster_spec_renders_servers_trainer_and_resources(path: Path, tmp_path: Path) -> None:
    spec = load_spec(path)
    http = {n: t for n, t in spec.teachers.items() if t.kind != "megatron"}
    assert http and all(t.serve is not None for t in http.values()), "every HTTP teacher is served from the spec"
    text = render_scripts(spec, str(path), [], cpu=False)["hetjob"]
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    requests = component_requests(text)
    # one het component per served teacher, then the student's SGLang rollout servers, then the trainer
    assert spec.rollout.engine == "sglang" and spec.rollout.sglang.urls is None
    assert len(requests) == len(http) + 2
    for line in requests:
        assert re.search(r"--gpus-per-node=\d+", line) and re.search(r"--cpus-per-task=\d+", line), line
        assert "--exclusive" in line and "--mem=" in line, line
    assert requests[-1].startswith(f"#SBATCH --nodes={spec.launcher.nodes} ")
    for i, (name, teacher) in enumerate(http.items()):
        model = teacher.served_model
        assert model and f"prepare_model {model} " in text
        start = re.search(
            rf"^start_servers {i} {name} \"\$MODEL_{i}\" (\d+) (\d+) .*--het-group={i}"
            rf" --cpus-per-task={teacher.serve.resources.cpus_per_task}$",
            text,
            re.M,
        )
        assert start, f"teacher {name} is not started"
        assert int(start.group(2)) == spec.teacher_port(name)
        assert f"teachers.{name}.discovery_file=$DISCOVERY_DIR/{name}.addr" in text
    server_fn = text[text.index("server_0()") : text.index("export -f server_0")]
    serve = next(iter(http.values())).serve
    for flag in (
        "-m sglang.launch_server",
        '--model-path "$1"',
        f"--tp-size {serve.tp}",
        f"--dp-size {serve.dp}",
        f"--mem-fraction-static {serve.mem_fraction_static:g}",
        f"--context-length {serve.context_length or spec.seq_length + 7}",  # SGLang 0.5.23: inputs <= context - 7
    ):
        assert flag in " ".join(server_fn.replace("\\\n", " ").split()), flag
    # the trainer starts only after every server group answered /health, with the NCCL environment
    wait, train = text.index('wait_for_servers "$DISCOVERY_DIR"'), text.index("start_trainer ")
    assert text.index("start_servers 0 ") < wait < train
    assert "export NCCL_IB_TIMEOUT=" in text[wait:train] and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert f"--signal=B:USR1@{spec.launcher.signal_lead_s}" in text and "--shutdown-timeout=" not in text
    rollout = spec.rollout.sglang
    assert requests[-2].startswith(f"#SBATCH --nodes={rollout.nodes} "), requests[-2]
    start = re.search(
        rf"^start_servers {len(http)} rollout \"\$MODEL_{len(http)}\" {rollout.nodes} {rollout.port} ", text, re.M
    )
    assert start and text.index(start.group(0)) < wait, "the rollout servers start before the trainer waits"
    assert "rollout.sglang.discovery_file=$DISCOVERY_DIR/rollout.addr" in text
    assert f"--het-group={len(http) + 1} --cpus-per-task={spec.launcher.resources.cpus_per_task}" in text[train:]


def test_checkpoint_teacher_is_converted_once_for_sglang(tmp_path: Path) -> None:
    path = REPO / "yaml" / "camopd_medical_qwen3_8b.yaml"
    spec = load_spec(
        path,
        [
            "teachers.medical.serve.model=/data/ckpt/medical_teacher",
            "teachers.medical.serve.hf_dir=/data/served/medical",
        ],
    )
    (c,) = [c for c in server_components(spec, cpu=False) if c.name == "medical"]
    assert (c.model, c.hf_dir) == ("/data/ckpt/medical_teacher", "/data/served/medical")
    text = render_scripts(spec, str(path), [], cpu=False)["hetjob"]
    assert "prepare_model /data/ckpt/medical_teacher /data/served/medical --het-group=1" in text
    assert 'source "$CAMOPD_LIB"' in text and "megatron_camopd.launch.servers ensure-hf" in LIB_SH.read_text()


def test_container_image_reaches_every_srun(tmp_path: Path) -> None:
    path = REPO / "yaml" / "uniopd_math.yaml"
    image = "nvcr.io/nvidia/pytorch:25.01-py3"
    spec = load_spec(
        path,
        [
            f"launcher.resources.container_image={image}",
            f"teachers.math.serve.resources.container_image={image}",
            "launcher.resources.container_mounts=[/data:/data]",
        ],
    )
    text = render_scripts(spec, str(path), [], cpu=False)["hetjob"]
    assert text.count(f"--container-image={image}") >= 3  # conversion step, servers, trainer
    assert "--container-mounts=/data:/data" in text
