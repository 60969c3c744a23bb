"""`camopd sbatch SPEC`: render ready-to-submit Slurm scripts for a spec (and optionally submit them).

Topology: the frozen teachers run as SGLang servers in sibling jobs of the trainer, either as the
first components of one heterogeneous job (`launcher.topology: hetjob`) or as a separate job the trainer job
depends on (`dependency`). Every teacher the spec loads in-process (`hf_path`/`checkpoint`) is served when
`launcher.teacher_nodes > 0`; the trainer then gets `teachers.<name>.discovery_file=...` overrides. The scripts are
rendered from `templates/*.sbatch` (placeholders `@{NAME}`, one source of truth shared with the hand-editable
examples in `slurm/`), with the shared bash functions of `templates/lib.sh` inlined, so a rendered script is
self-contained. `--cpu` renders for machines without GPUs (`camopd serve-teacher`, no `--gpus-per-node`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from megatron_camopd.config import load_spec
from megatron_camopd.config.run_sections import LauncherConfig
from megatron_camopd.config.spec import ExperimentSpec
from megatron_camopd.errors import SpecError

TEMPLATES = Path(__file__).with_name("templates")
EXAMPLE_FILES = {"hetjob": "camopd_hetjob.sbatch", "teachers": "camopd_teachers.sbatch", "train": "camopd_train.sbatch"}


class SbatchTemplate(Template):
    """`string.Template` with `@{NAME}` placeholders only, so bash's `$x`, `${x}` and `"$@"` pass through."""

    delimiter = "@"
    pattern = r"@(?:(?P<escaped>@(?=\{))|\{(?P<braced>[A-Z][A-Z0-9_]*)\}|(?P<named>(?!))|(?P<invalid>(?!)))"


@dataclass(frozen=True)
class Timing:
    """Launcher timings (seconds): pre-timeout signal lead, server start-up, dead-teacher detection, polling."""

    signal_lead_s: int = 300
    health_timeout_s: int = 1800
    teacher_dead_s: int = 300
    watch_interval_s: int = 30
    shutdown_timeout_s: int = 240


@dataclass(frozen=True)
class ServedTeacher:
    """A teacher the launcher serves over HTTP: its spec name and the model directory given to the server."""

    name: str
    model: str


def served_teachers(spec: ExperimentSpec) -> list[ServedTeacher]:
    """The in-process teachers of `spec` that the launcher turns into servers (none when teacher_nodes is 0)."""
    launcher = spec.launcher or LauncherConfig()
    if launcher.teacher_nodes == 0:
        return []
    return [ServedTeacher(name, str(cfg.hf_path or cfg.checkpoint))
            for name, cfg in spec.teachers.items() if cfg.kind == "megatron"]


def render_template(name: str, values: dict[str, str]) -> str:
    """Fill `templates/<name>.sbatch`; a missing value is an error, `lib.sh` is inlined as `@{LIB}`."""
    text = (TEMPLATES / f"{name}.sbatch").read_text()
    lib = (TEMPLATES / "lib.sh").read_text().rstrip("\n")
    try:
        return SbatchTemplate(text).substitute({**values, "LIB": lib})
    except KeyError as exc:
        raise SpecError(f"template {name}.sbatch needs a value for @{{{exc.args[0]}}}") from None


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _resources(launcher: LauncherConfig, nodes: int, gpus: int, cpu: bool) -> str:
    parts = [f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={launcher.time}"]
    if not cpu:
        parts.append(f"--gpus-per-node={gpus}")
    if launcher.partition:
        parts.append(f"--partition={launcher.partition}")
    if launcher.account:
        parts.append(f"--account={launcher.account}")
    return "#SBATCH " + " ".join(parts)


def sbatch_values(spec: ExperimentSpec, spec_path: str, overrides: list[str], *, cpu: bool,
                  timing: Timing = Timing(), python: str = sys.executable, workdir: str | None = None) -> dict[str, str]:
    """Every template value for `spec` (bash-quoted), shared by the three scripts."""
    launcher = spec.launcher or LauncherConfig()
    teachers = served_teachers(spec)
    log_dir = os.path.abspath(launcher.log_dir or os.path.join(spec.checkpoint.dir, "logs"))
    trainer = _resources(launcher, launcher.nodes, launcher.gpus_per_node, cpu)
    components = []
    for i, t in enumerate(teachers):
        components += [f"# ---- het component {i}: teacher {t.name}",
                       _resources(launcher, launcher.teacher_nodes, launcher.teacher_gpus, cpu), "#SBATCH hetjob"]
    components += [f"# ---- het component {len(teachers)}: trainer", trainer]
    teacher_job = _resources(launcher, max(1, launcher.teacher_nodes * len(teachers)), launcher.teacher_gpus, cpu)
    env = "\n".join(f"export {k}={_q(v)}" for k, v in launcher.env.items()) or "# (launcher.env: none)"
    return {
        "JOB_NAME": spec.name, "LOG_DIR": _q(log_dir), "WORKDIR": _q(workdir or os.getcwd()), "PYTHON": _q(python),
        "SPEC": _q(os.path.abspath(spec_path)), "OVERRIDES": " ".join(_q(o) for o in overrides),
        "NODES": str(launcher.nodes), "NPROC_PER_NODE": str(launcher.gpus_per_node),
        "TEACHERS": " ".join(_q(t.name) for t in teachers), "TEACHER_MODELS": " ".join(_q(t.model) for t in teachers),
        "TEACHER_NODES": str(max(1, launcher.teacher_nodes)), "TEACHER_BACKEND": "camopd" if cpu else "sglang",
        "TEACHER_TP": str(launcher.teacher_gpus), "SGLANG_PORT": str(launcher.sglang_port),
        "SGLANG_ARGS": _q(" ".join(launcher.sglang_args)), "SIGNAL": f"B:USR1@{timing.signal_lead_s}",
        "HEALTH_TIMEOUT_S": str(timing.health_timeout_s), "TEACHER_DEAD_S": str(timing.teacher_dead_s),
        "WATCH_INTERVAL_S": str(timing.watch_interval_s), "SHUTDOWN_TIMEOUT_S": str(timing.shutdown_timeout_s),
        "ENV_EXPORTS": env, "SBATCH_COMPONENTS": "\n".join(components), "SBATCH_TRAINER": trainer,
        "SBATCH_TEACHERS": teacher_job,
    }


def render_scripts(spec: ExperimentSpec, spec_path: str, overrides: list[str], *, cpu: bool,
                   timing: Timing = Timing(), **kwargs: str) -> dict[str, str]:
    """The scripts for the spec's topology: {"hetjob": text} or {"teachers": text, "train": text}."""
    values = sbatch_values(spec, spec_path, overrides, cpu=cpu, timing=timing, **kwargs)
    topology = (spec.launcher or LauncherConfig()).topology
    kinds = ["hetjob"] if topology == "hetjob" or not served_teachers(spec) else ["teachers", "train"]
    return {kind: render_template(kind, values) for kind in kinds}


def example_scripts() -> dict[str, str]:
    """The hand-editable scripts of `slurm/`: the templates filled with placeholders a user edits."""
    launcher = LauncherConfig(teacher_nodes=1, teacher_gpus=8, nodes=4, gpus_per_node=8, time="08:00:00")
    placeholder = '"${SPEC:?set SPEC=path/to/spec.yaml (sbatch --export=ALL,SPEC=...)}"'
    values = {
        "JOB_NAME": "camopd", "LOG_DIR": "logs", "WORKDIR": '"${SLURM_SUBMIT_DIR:-$PWD}"',
        "PYTHON": '"${PYTHON:-python}"', "SPEC": placeholder, "OVERRIDES": "",
        "NODES": "4", "NPROC_PER_NODE": "8", "TEACHERS": "general domain",
        "TEACHER_MODELS": "/path/to/teacher_general_hf /path/to/teacher_domain_hf", "TEACHER_NODES": "1",
        "TEACHER_BACKEND": "sglang", "TEACHER_TP": "8", "SGLANG_PORT": "30000", "SGLANG_ARGS": "''",
        "SIGNAL": "B:USR1@300", "HEALTH_TIMEOUT_S": "1800", "TEACHER_DEAD_S": "300", "WATCH_INTERVAL_S": "30",
        "SHUTDOWN_TIMEOUT_S": "240", "ENV_EXPORTS": "# export HF_HOME=/path/to/cache   # extra environment",
        "SBATCH_COMPONENTS": "\n".join([
            "# ---- het component 0: teacher general", _resources(launcher, 1, 8, False), "#SBATCH hetjob",
            "# ---- het component 1: teacher domain", _resources(launcher, 1, 8, False), "#SBATCH hetjob",
            "# ---- het component 2: trainer", _resources(launcher, 4, 8, False)]),
        "SBATCH_TRAINER": _resources(launcher, 4, 8, False), "SBATCH_TEACHERS": _resources(launcher, 2, 8, False),
    }
    return {EXAMPLE_FILES[kind]: render_template(kind, values) for kind in EXAMPLE_FILES}


def write_scripts(scripts: dict[str, str], out: str) -> dict[str, Path]:
    """Write the scripts (one: to `out`; two: `<stem>_teachers<suffix>` and `<stem>_train<suffix>`)."""
    path = Path(out)
    paths = {kind: path if len(scripts) == 1 else path.with_name(f"{path.stem}_{kind}{path.suffix or '.sbatch'}")
             for kind in scripts}
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
    """Submit rendered scripts (teachers first for the dependency topology); returns kind -> job id."""
    os.makedirs(log_dir, exist_ok=True)
    if "hetjob" in paths:
        return {"hetjob": _sbatch(str(paths["hetjob"]))}
    teachers = _sbatch(str(paths["teachers"]))
    train = _sbatch(f"--dependency=after:{teachers}", f"--export=ALL,TEACHER_JOB_ID={teachers}", str(paths["train"]))
    return {"teachers": teachers, "train": train}


def sbatch_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="camopd sbatch", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (also passed to `camopd train`)")
    ap.add_argument("-o", "--output", help="write the script here (two scripts: <stem>_teachers/_train)")
    ap.add_argument("--cpu", action="store_true", help="no GPUs: `camopd serve-teacher` instead of SGLang")
    ap.add_argument("--submit", action="store_true", help="submit with sbatch (scripts go to the log dir)")
    ap.add_argument("--signal-lead", type=int, default=Timing.signal_lead_s, help="USR1 this many s before the limit")
    ap.add_argument("--health-timeout", type=int, default=Timing.health_timeout_s, help="server start-up limit (s)")
    ap.add_argument("--teacher-dead", type=int, default=Timing.teacher_dead_s, help="unhealthy teacher limit (s)")
    ap.add_argument("--watch-interval", type=int, default=Timing.watch_interval_s, help="health poll period (s)")
    ap.add_argument("--shutdown-timeout", type=int, default=Timing.shutdown_timeout_s,
                    help="how long torchrun waits for the checkpoint after the signal (s)")
    args = ap.parse_intermixed_args(argv)
    spec = load_spec(args.spec, args.overrides)
    timing = Timing(args.signal_lead, args.health_timeout, args.teacher_dead, args.watch_interval,
                    args.shutdown_timeout)
    scripts = render_scripts(spec, args.spec, list(args.overrides), cpu=args.cpu, timing=timing)
    log_dir = (spec.launcher or LauncherConfig()).log_dir or os.path.join(spec.checkpoint.dir, "logs")
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
