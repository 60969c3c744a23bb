"""`camopd launch SPEC --cluster slurm|local|debug`: run a spec through submitit instead of an sbatch script.

Order of events: one submitit job per served teacher (the spec's in-process teachers, see `sbatch.served_teachers`)
starts a server per node and registers `host:port` in a discovery file; once every teacher answers `/health` the
trainer job is submitted (the spec's `launcher.nodes`, one task per node, each running torchrun), and when training
ends or fails the teacher jobs are cancelled. A trainer job that reaches its time limit is checkpointed by the
trainer (submitit's pre-timeout signal -> SIGTERM -> checkpoint after the current step) and requeued through
`Checkpointable.checkpoint`, so the resubmitted job resumes from that checkpoint. submitit has no heterogeneous
jobs, hence separate jobs. `--cluster local|debug` runs on this machine (LocalExecutor; debug runs the trainer
in-process with DebugExecutor, the servers still as local jobs).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import submitit

from megatron_camopd.config import load_spec
from megatron_camopd.config.run_sections import LauncherConfig
from megatron_camopd.errors import TeacherError
from megatron_camopd.launch.sbatch import served_teachers

EXIT_REQUEUE = 75


def slurm_minutes(text: str) -> int:
    """Minutes in a Slurm time string (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`), rounded up."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]  # type: ignore[assignment]
    seconds = ((int(days or 0) * 24 + h) * 60 + m) * 60 + s
    return max(1, -(-seconds // 60))


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the job process dies (no orphaned servers/trainers)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _trainer_preexec() -> None:
    """preexec_fn of torchrun: as `_die_with_parent`, and ignore submitit's USR2 timeout signal (Slurm sends it
    to every process of the step; the job process handles it through `TrainerJob.checkpoint`)."""
    _die_with_parent()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def http_ok(url: str, timeout: float = 5.0) -> bool:
    """True when `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except OSError:
        return False


def register_address(path: str, address: str) -> None:
    """Append `address` to the discovery file under a lock, publishing it atomically (temp file + rename)."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = Path(path).read_text() if os.path.exists(path) else ""
        tmp = f"{path}.tmp.{os.getpid()}"
        Path(tmp).write_text(old + f"{address}\n")
        os.replace(tmp, path)


class TeacherServer:
    """A submitit job body: serve one teacher on this node until cancelled; registered once healthy."""

    def __init__(self, name: str, model: str, addr_file: str, backend: str, python: str, tp: int = 1,
                 sglang_port: int = 30000, sglang_args: tuple[str, ...] = (), health_timeout_s: float = 1800) -> None:
        self.name, self.model, self.addr_file, self.backend, self.python = name, model, addr_file, backend, python
        self.tp, self.sglang_port, self.sglang_args, self.health_timeout_s = tp, sglang_port, sglang_args, health_timeout_s

    def __call__(self) -> int:
        host = socket.gethostname()
        ready = f"{self.addr_file}.{host}.{os.getpid()}.ready"
        if self.backend == "sglang":
            cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model, "--host", "0.0.0.0",
                   "--port", str(self.sglang_port), "--tp", str(self.tp), *self.sglang_args]
        else:
            cmd = [self.python, "-m", "megatron_camopd.cli", "serve-teacher", "--checkpoint", self.model,
                   "--host", "0.0.0.0", "--port", "0", "--ready-file", ready]
        proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads here)
        deadline = time.monotonic() + self.health_timeout_s
        port = str(self.sglang_port) if self.backend == "sglang" else ""
        while not (port and http_ok(f"http://{host}:{port}/health")):
            if proc.poll() is not None:
                raise TeacherError(f"teacher {self.name} on {host} exited (rc={proc.returncode}) before it was healthy")
            if time.monotonic() > deadline:
                proc.terminate()
                raise TeacherError(f"teacher {self.name} on {host} not healthy after {self.health_timeout_s:.0f}s")
            if not port and os.path.exists(ready):
                port = Path(ready).read_text().strip().rpartition(":")[2]
            time.sleep(0.5)
        register_address(self.addr_file, f"{host}:{port}")
        print(f"teacher {self.name} serves {self.model} at {host}:{port}", flush=True)
        rc = proc.wait()
        if rc != 0:
            raise TeacherError(f"teacher {self.name} server on {host} exited with rc={rc}")
        return rc


def _master_addr(hostname: str) -> str:
    """The address of a Slurm node (its NodeAddr; the name itself on most clusters or off Slurm)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", hostname], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return hostname
    for word in out.stdout.split():
        if word.startswith("NodeAddr="):
            return word.split("=", 1)[1]
    return hostname


class TrainerJob(submitit.helpers.Checkpointable):
    """A submitit job body (one task per node): torchrun `camopd train`; requeued from its checkpoint on timeout."""

    def __init__(self, python: str, spec: str, overrides: list[str], nproc_per_node: int,
                 shutdown_timeout_s: int = 240, workdir: str | None = None) -> None:
        self.args = (python, spec, list(overrides), nproc_per_node, shutdown_timeout_s, workdir or os.getcwd())
        self._proc: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self.args, "_proc": None}

    def __call__(self) -> int:
        python, spec, overrides, nproc, shutdown, workdir = self.args
        env = submitit.JobEnvironment()
        hosts = env.hostnames if env.num_nodes > 1 else [socket.gethostname()]
        port = 20000 + int(str(env.job_id).split("_")[0]) % 20000
        cmd = [python, "-m", "torch.distributed.run", f"--nnodes={env.num_nodes}", f"--nproc-per-node={nproc}",
               f"--node-rank={env.node}", f"--master-addr={_master_addr(hosts[0])}", f"--master-port={port}",
               f"--shutdown-timeout={shutdown}",
               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
               "-m", "megatron_camopd.cli", "train", spec, *overrides]
        self._proc = subprocess.Popen(cmd, cwd=workdir, preexec_fn=_trainer_preexec)  # noqa: PLW1509 (no threads here)
        rc = self._proc.wait()
        if rc != 0:
            raise RuntimeError(f"camopd train exited with rc={rc} (see the job log)")
        return rc

    def checkpoint(self) -> Any:
        """submitit's timeout hook: let the trainer checkpoint (SIGTERM), then resubmit a fresh copy."""
        if self._proc is not None and self._proc.poll() is None:
            # the trainer ranks themselves, not torchrun: it would signal their whole process groups, killing the
            # checkpoint writer's helper processes
            for rank in psutil.Process(self._proc.pid).children():
                rank.send_signal(signal.SIGUSR1)
            try:
                self._proc.wait(timeout=self.args[4] + 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return submitit.helpers.DelayedSubmission(TrainerJob(*self.args))


def make_executor(cluster: str, folder: Path, name: str, launcher: LauncherConfig, nodes: int, gpus: int,
                  cpu: bool) -> Any:
    """A submitit executor for one job kind (teacher servers or the trainer)."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"name": name, "timeout_min": slurm_minutes(launcher.time), "nodes": nodes,
                              "tasks_per_node": 1}
    if not cpu:
        params["gpus_per_node"] = gpus
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = 120
        if launcher.partition:
            params["slurm_partition"] = launcher.partition
        if launcher.account:
            params["slurm_additional_parameters"] = {"account": launcher.account}
        params["slurm_setup"] = [f"export {k}={v!r}" for k, v in launcher.env.items()]
    executor.update_parameters(**params)
    return executor


def wait_for_teachers(addr_files: dict[str, str], jobs: list[Any], nodes: int, timeout_s: float) -> None:
    """Until every discovery file lists `nodes` healthy servers; `TeacherError` if a job ends or time runs out."""
    from megatron_camopd.teachers.discovery import read_discovery_file

    deadline = time.monotonic() + timeout_s
    for name, path in addr_files.items():
        while sum(http_ok(f"{url}/health") for url in read_discovery_file(path)) < nodes:
            for job in jobs:
                if job.done():
                    raise TeacherError(f"teacher job {job.job_id} ended before teacher {name} was healthy:\n"
                                       f"{job.stderr() or ''}")
            if time.monotonic() > deadline:
                raise TeacherError(f"teacher {name}: no {nodes} healthy servers in {path} after {timeout_s:.0f}s")
            time.sleep(0.5)
        print(f"teacher {name} ready: {', '.join(read_discovery_file(path))}", flush=True)


def launch_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="camopd launch", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (also passed to `camopd train`)")
    ap.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm")
    ap.add_argument("--cpu", action="store_true", help="no GPUs (implied by local/debug without CUDA)")
    ap.add_argument("--folder", help="submitit logs (default: <log dir>/submitit)")
    ap.add_argument("--health-timeout", type=float, default=1800.0, help="teacher server start-up limit (s)")
    ap.add_argument("--shutdown-timeout", type=int, default=240, help="checkpoint time after the signal (s)")
    args = ap.parse_intermixed_args(argv)
    spec = load_spec(args.spec, args.overrides)
    launcher = spec.launcher or LauncherConfig()
    cpu = args.cpu or (args.cluster != "slurm" and not _has_cuda())
    log_dir = Path(launcher.log_dir or os.path.join(spec.checkpoint.dir, "logs")).resolve()
    folder = Path(args.folder or log_dir / "submitit").resolve()
    discovery = log_dir / "discovery" / f"launch-{uuid.uuid4().hex[:8]}"
    discovery.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    teachers = served_teachers(spec)
    server_cluster = "local" if args.cluster == "debug" else args.cluster
    addr_files = {t.name: str(discovery / f"{t.name}.addr") for t in teachers}
    jobs: list[Any] = []
    try:
        for t in teachers:
            ex = make_executor(server_cluster, folder, f"{spec.name}-{t.name}", launcher, launcher.teacher_nodes,
                               launcher.teacher_gpus, cpu)
            body = TeacherServer(t.name, t.model, addr_files[t.name], "camopd" if cpu else "sglang", python,
                                 launcher.teacher_gpus, launcher.sglang_port, tuple(launcher.sglang_args),
                                 args.health_timeout)
            jobs.append(ex.submit(body))
            print(f"teacher {t.name}: job {jobs[-1].job_id}", flush=True)
        wait_for_teachers(addr_files, jobs, max(1, launcher.teacher_nodes), args.health_timeout)
        overrides = list(args.overrides)
        for name, path in addr_files.items():
            overrides += [f"teachers.{name}.hf_path=null", f"teachers.{name}.checkpoint=null",
                          f"teachers.{name}.discovery_file={path}"]
        ex = make_executor(args.cluster, folder, spec.name, launcher, launcher.nodes, launcher.gpus_per_node, cpu)
        trainer = ex.submit(TrainerJob(python, os.path.abspath(args.spec), overrides, launcher.gpus_per_node,
                                       args.shutdown_timeout))
        print(f"trainer: job {trainer.job_id} (logs in {folder})", flush=True)
        trainer.results()
        print("training finished", flush=True)
        return 0
    finally:
        for job in jobs:
            job.cancel(check=False)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(launch_main(sys.argv[1:]))
