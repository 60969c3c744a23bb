"""`camopd sbatch SPEC`: render ready-to-submit Slurm scripts for a spec (and optionally submit them).

Topology: the servers the spec asks for (each teacher with a `serve` section, the student's SGLang rollout
servers for `rollout.engine: sglang` without urls; see launch/servers.py) run as the first components of one
heterogeneous job with the trainer last (`launcher.topology: hetjob`), or as a separate job the trainer job depends
on (`dependency`). Every component requests its own resources (`--gpus-per-node`, `--exclusive`,
`--cpus-per-task`, `--mem`; `resources` of the launcher, of `teachers.<name>.serve` and of `rollout.sglang`), and
its srun steps repeat the CPU count (srun does not inherit `--cpus-per-task` since Slurm 22.05) and the optional
pyxis container. The trainer gets `teachers.<name>.discovery_file=...` / `rollout.sglang.discovery_file=...`
overrides pointing at the servers it waited for. The scripts are rendered from `templates/*.sbatch` (placeholders
`@{NAME}`, one source of truth shared with the examples in `slurm/`, which `python tools/render_slurm.py` writes
and CI checks); a rendered script sources the shared bash functions of the installed package's `templates/lib.sh`,
whose discovery and health steps are launch/protocol.py's (the same code `camopd launch` runs). `--cpu` renders for
machines without GPUs (no `--gpus-per-node`; SGLang with its CPU flags, or `camopd serve` with `--server-backend
camopd`). Timings (pre-timeout lead, health checks) are `launcher` fields.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

from megatron_camopd.config import load_spec
from megatron_camopd.config.serving import SGLANG_VERSION, VLLM_VERSION, SlurmResources
from megatron_camopd.config.spec import ExperimentSpec
from megatron_camopd.errors import SpecError
from megatron_camopd.launch.servers import (
    ADDR,
    BACKENDS,
    BASE_GPU,
    MODEL,
    PORT,
    PYTHON,
    READY,
    SGLANG_PY,
    VLLM_PY,
    Component,
    launcher_of,
    server_components,
    trainer_component,
)

TEMPLATES = Path(__file__).with_name("templates")
EXAMPLE_SPEC = TEMPLATES / "example_spec.yaml"
EXAMPLE_FILES = {"hetjob": "camopd_hetjob.sbatch", "teachers": "camopd_teachers.sbatch", "train": "camopd_train.sbatch"}


class SbatchTemplate(Template):
    """`string.Template` with `@{NAME}` placeholders only, so bash's `$x`, `${x}` and `"$@"` pass through."""

    delimiter = "@"
    pattern = r"@(?:(?P<escaped>@(?=\{))|\{(?P<braced>[A-Z][A-Z0-9_]*)\}|(?P<named>(?!))|(?P<invalid>(?!)))"  # type: ignore[assignment]  # Template compiles a str


def render_template(name: str, values: dict[str, str]) -> str:
    """Fill `templates/<name>.sbatch`; a missing value is an error."""
    text = (TEMPLATES / f"{name}.sbatch").read_text()
    try:
        return SbatchTemplate(text).substitute(values)
    except KeyError as exc:
        raise SpecError(f"template {name}.sbatch needs a value for @{{{exc.args[0]}}}") from None


def _q(value: object) -> str:
    return shlex.quote(str(value))


def sbatch_line(spec: ExperimentSpec, c: Component, cpu: bool) -> str:
    """The `#SBATCH` request of one component."""
    launcher, res = launcher_of(spec), c.resources
    parts = [f"--nodes={c.nodes}", "--ntasks-per-node=1", f"--time={launcher.time}"]
    if not cpu:
        parts.append(f"--gpus-per-node={c.gpus_per_node}")
    if res.exclusive:
        parts.append("--exclusive")
    if res.cpus_per_task is not None:
        parts.append(f"--cpus-per-task={res.cpus_per_task}")
    if res.mem is not None:
        parts.append(f"--mem={res.mem}")
    if launcher.partition:
        parts.append(f"--partition={launcher.partition}")
    if launcher.account:
        parts.append(f"--account={launcher.account}")
    return "#SBATCH " + " ".join(parts)


def srun_args(res: SlurmResources, group: int | None, container: SlurmResources | None = None) -> list[str]:
    """The srun arguments of a component's steps (bash words): het group, CPUs per task, pyxis container."""
    words = [f"--het-group={group}"] if group is not None else []
    cpus = (
        str(res.cpus_per_task)
        if res.cpus_per_task is not None
        else ('"$(group_cpus)"' if group is None else f'"$(group_cpus {group})"')
    )
    words.append(f"--cpus-per-task={cpus}")
    image = container or res
    if image.container_image:
        words += [f"--container-image={_q(image.container_image)}", '--container-workdir="$WORKDIR"']
        if image.container_mounts:
            words.append(f"--container-mounts={_q(','.join(image.container_mounts))}")
    return words


def _bash_word(arg: str) -> str:
    """A server argv element as bash: the placeholders become the function's arguments or $PYTHON."""
    for mark, var in (
        (PYTHON, "$PYTHON"),
        (SGLANG_PY, "$SGLANG_PYTHON"),
        (VLLM_PY, "$VLLM_PYTHON"),
        (MODEL, "$1"),
        (PORT, "$2"),
        (READY, "$3"),
        (BASE_GPU, "$4"),
    ):
        if arg == mark:
            return f'"{var}"'
    return _q(arg)


def _wrap(words: list[str], indent: str = "    ", width: int = 100) -> str:
    """Bash words joined into continuation lines of at most ~`width` characters."""
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = indent + word
        else:
            line = f"{line} {word}" if line else word
    return " \\\n".join(lines + [line])


def server_function(i: int, c: Component) -> str:
    """`server_<i> MODEL PORT READY BASE_GPU`: exec one server of component `c` (its environment, its command)."""
    words = ["exec"] + (["env"] + [f"{k}={_q(v)}" for k, v in c.env.items()] if c.env else [])
    words += [_bash_word(a) for a in c.argv]
    return (
        f"server_{i}() {{  # MODEL PORT READY BASE_GPU: one {c.kind} server of {c.name}\n"
        f"  {_wrap(words)}\n}}\nexport -f server_{i}"
    )


def _label(c: Component) -> str:
    return f"teacher {c.name}" if c.kind == "teacher" else "rollout servers"


def start_servers_block(servers: list[Component], spec: ExperimentSpec, het: bool) -> str:
    """The bash that prepares each server group's model (checkpoint -> HF once, SGLang only) and starts it."""
    checks = ((SGLANG_PY, "check_sglang_version"), (VLLM_PY, "check_vllm_version"))
    lines = [check for mark, check in checks if any(mark in c.argv for c in servers)]
    trainer_res = launcher_of(spec).resources
    for i, c in enumerate(servers):
        group = i if het else None
        what = f"servers of {_label(c)} (het component {i})" if het else f"servers of {_label(c)}"
        convert = " ".join(srun_args(c.resources, group, container=trainer_res))
        run = " ".join(srun_args(c.resources, group))
        lines += [
            f"# {what}: {c.nodes} node(s), model {c.model}",
            f"MODEL_{i}=$(prepare_model {_q(c.model)} {_q(c.hf_dir)} {convert}) ||",
            f"  die {_q(f'{what}: cannot prepare {c.model} for serving')}",
            f'start_servers {i} {_q(c.name)} "$MODEL_{i}" {c.nodes} {c.port} {_q(what)} {c.per_node} '
            f"{c.gpus_per_server} {run}",
        ]
    return "\n".join(lines) if lines else "# (no servers: every teacher runs in process)"


def train_overrides(servers: list[Component]) -> str:
    """The trainer's overrides pointing each server group's consumer at its discovery file."""
    lines = []
    for c in servers:
        words = [
            f'"{o.replace(ADDR, "$DISCOVERY_DIR/" + c.name + ".addr")}"' if ADDR in o else _q(o) for o in c.overrides
        ]
        lines.append("\n  " + " ".join(words))
    return "".join(lines) + ("\n" if lines else "")


def _components_block(lines: list[tuple[str, str]]) -> str:
    out: list[str] = []
    for i, (title, line) in enumerate(lines):
        if len(lines) > 1:
            out.append(f"# ---- het component {i}: {title}")
        out.append(line)
        if i < len(lines) - 1:
            out.append("#SBATCH hetjob")
    return "\n".join(out)


def sbatch_values(
    spec: ExperimentSpec,
    spec_path: str,
    overrides: list[str],
    *,
    cpu: bool,
    backend: str = "sglang",
    python: str | None = None,
    workdir: str | None = None,
) -> dict[str, dict[str, str]]:
    """Every template value for `spec` (bash-quoted), per script kind: {"hetjob": ..., "teachers": ..., "train":}.
    `backend`: the servers' (`sglang`, with its CPU flags when `cpu`; or `camopd`)."""
    launcher = launcher_of(spec)
    servers = server_components(spec, cpu=cpu, backend=backend)
    trainer = trainer_component(spec)
    log_dir = os.path.abspath(launcher.log_dir or os.path.join(spec.checkpoint.dir, "logs"))
    env = "\n".join(f"export {k}={_q(v)}" for k, v in launcher.env.items()) or "# (launcher.env: none)"
    trainer_env = (
        "\n".join(f"export {k}={_q(v)}" for k, v in launcher.trainer_env.items()) or "# (launcher.trainer_env: none)"
    )
    common = {
        "JOB_NAME": spec.name,
        "LOG_DIR": _q(log_dir),
        "WORKDIR": _q(workdir or os.getcwd()),
        "PYTHON": _q(python or launcher.python or sys.executable),
        "SGLANG_PYTHON": _q(launcher.sglang_python or python or launcher.python or sys.executable),
        "VLLM_PYTHON": _q(launcher.vllm_python or python or launcher.python or sys.executable),
        "SPEC": _q(os.path.abspath(spec_path)),
        "OVERRIDES": " ".join(_q(o) for o in overrides),
        "NODES": str(launcher.nodes),
        "NPROC_PER_NODE": str(launcher.gpus_per_node),
        "SIGNAL": f"B:USR1@{launcher.signal_lead_s}",
        "SHUTDOWN_TIMEOUT_S": str(launcher.shutdown_timeout_s),
        "HEALTH_TIMEOUT_S": str(launcher.health_timeout_s),
        "HEALTH_CHECK_TIMEOUT_S": f"{launcher.health_check_timeout_s:g}",
        "TEACHER_DEAD_S": str(launcher.teacher_dead_s),
        "WATCH_INTERVAL_S": str(launcher.watch_interval_s),
        "ENV_EXPORTS": env,
        "TRAINER_ENV": trainer_env,
        "SERVER_BACKEND": backend,
        "SGLANG_TESTED": SGLANG_VERSION,
        "VLLM_TESTED": VLLM_VERSION,
        "SERVERS": " ".join(_q(c.name) for c in servers),
        "SERVER_LABELS": " ".join(_q(_label(c)) for c in servers),
        "SERVER_COUNTS": " ".join(str(c.count) for c in servers),
        "SERVER_FUNCS": "\n".join(server_function(i, c) for i, c in enumerate(servers)) or "# (no servers)",
        "TRAIN_OVERRIDES": train_overrides(servers),
    }
    k = len(servers)
    het_lines = [(f"{_label(c)}", sbatch_line(spec, c, cpu)) for c in servers] + [
        ("trainer", sbatch_line(spec, trainer, cpu))
    ]
    hetjob = {
        **common,
        "SBATCH_COMPONENTS": _components_block(het_lines),
        "START_SERVERS": start_servers_block(servers, spec, het=True),
        "TRAINER_NODELIST": f'"$SLURM_JOB_NODELIST_HET_GROUP_{k}"' if k else '"$SLURM_JOB_NODELIST"',
        "TRAINER_SRUN_ARGS": " ".join(srun_args(trainer.resources, k if k else None)),
    }
    server_job = {
        **common,
        "SBATCH_SERVERS": _components_block(het_lines[:-1]) or "# (no servers)",
        "START_SERVERS": start_servers_block(servers, spec, het=k > 1),
    }
    train_job = {
        **common,
        "SBATCH_TRAINER": sbatch_line(spec, trainer, cpu),
        "TRAINER_SRUN_ARGS": " ".join(srun_args(trainer.resources, None)),
    }
    return {"hetjob": hetjob, "teachers": server_job, "train": train_job}


def render_scripts(
    spec: ExperimentSpec, spec_path: str, overrides: list[str], *, cpu: bool, backend: str = "sglang", **kwargs: str
) -> dict[str, str]:
    """The scripts for the spec's topology: {"hetjob": text} or {"teachers": text, "train": text}."""
    values = sbatch_values(spec, spec_path, overrides, cpu=cpu, backend=backend, **kwargs)
    topology = launcher_of(spec).topology
    servers = server_components(spec, cpu=cpu, backend=backend)
    kinds = ["hetjob"] if topology == "hetjob" or not servers else ["teachers", "train"]
    return {kind: render_template(kind, values[kind]) for kind in kinds}


def example_scripts() -> dict[str, str]:
    """The example scripts of `slurm/` (written by `tools/render_slurm.py`): `templates/example_spec.yaml` rendered
    with environment placeholders for what differs per user (the spec path, the working directory, the python)."""
    spec = load_spec(EXAMPLE_SPEC)
    values = sbatch_values(
        spec, str(EXAMPLE_SPEC), [], cpu=False, python='"${PYTHON:-python}"', workdir='"${SLURM_SUBMIT_DIR:-$PWD}"'
    )
    for kind_values in values.values():
        kind_values.update(
            LOG_DIR="logs",
            WORKDIR='"${SLURM_SUBMIT_DIR:-$PWD}"',
            PYTHON='"${PYTHON:-python}"',
            SPEC='"${SPEC:?set SPEC=path/to/spec.yaml (sbatch --export=ALL,SPEC=...)}"',
            JOB_NAME="camopd",
        )
    return {EXAMPLE_FILES[kind]: render_template(kind, values[kind]) for kind in EXAMPLE_FILES}


def write_scripts(scripts: dict[str, str], out: str) -> dict[str, Path]:
    """Write the scripts (one: to `out`; two: `<stem>_teachers<suffix>` and `<stem>_train<suffix>`)."""
    path = Path(out)
    paths = {
        kind: path if len(scripts) == 1 else path.with_name(f"{path.stem}_{kind}{path.suffix or '.sbatch'}")
        for kind in scripts
    }
    for kind, text in scripts.items():
        paths[kind].parent.mkdir(parents=True, exist_ok=True)
        paths[kind].write_text(text)
        paths[kind].chmod(0o755)
    return paths


def _sbatch(*args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SpecError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_scripts(paths: dict[str, Path], log_dir: str) -> dict[str, str]:
    """Submit rendered scripts (servers first for the dependency topology); returns kind -> job id."""
    os.makedirs(log_dir, exist_ok=True)
    if "hetjob" in paths:
        return {"hetjob": _sbatch(str(paths["hetjob"]))}
    servers = _sbatch(str(paths["teachers"]))
    train = _sbatch(f"--dependency=after:{servers}", f"--export=ALL,TEACHER_JOB_ID={servers}", str(paths["train"]))
    return {"teachers": servers, "train": train}


def sbatch_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="camopd sbatch", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (also passed to `camopd train`)")
    ap.add_argument("-o", "--output", help="write the script here (two scripts: <stem>_teachers/_train)")
    ap.add_argument(
        "--cpu", action="store_true", help="no GPUs: SGLang with its CPU flags (or --server-backend camopd)"
    )
    ap.add_argument(
        "--server-backend",
        choices=BACKENDS,
        default="sglang",
        help="sglang: real SGLang servers (launcher.sglang_python); camopd: `camopd serve` (CPU machines only)",
    )
    ap.add_argument("--submit", action="store_true", help="submit with sbatch (scripts go to the log dir)")
    args = ap.parse_intermixed_args(argv)
    if args.server_backend == "camopd" and not args.cpu:
        raise SpecError("--server-backend camopd: `camopd serve` is the CPU stand-in; add --cpu")
    spec = load_spec(args.spec, args.overrides)
    scripts = render_scripts(spec, args.spec, list(args.overrides), cpu=args.cpu, backend=args.server_backend)
    launcher = launcher_of(spec)
    log_dir = launcher.log_dir or os.path.join(spec.checkpoint.dir, "logs")
    out = args.output or (os.path.join(log_dir, f"{spec.name}.sbatch") if args.submit else None)
    if out is None:
        print("\n".join(scripts.values()), end="")
        return 0
    paths = write_scripts(scripts, out)
    for kind, path in paths.items():
        print(f"wrote {kind} script {path}")
    if args.submit:
        for kind, job in submit_scripts(paths, log_dir).items():
            print(f"submitted {kind} job {job}")
    return 0


if __name__ == "__main__":
    sys.exit(sbatch_main(sys.argv[1:]))
