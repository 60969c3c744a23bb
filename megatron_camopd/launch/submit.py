"""`camopd launch SPEC --cluster slurm|local|debug`: run a spec through submitit instead of an sbatch script.

Order of events: one submitit job per server group of the spec (each teacher with `serve`, the student's rollout
servers for `rollout.engine: sglang`; see launch/servers.py) starts a server per node (a camopd checkpoint is first
converted to HF once, by the job's first task) and registers `host:port` in a discovery file; once every server
answers `/health` the trainer job is submitted (the spec's `launcher.nodes`, one task per node, each running
torchrun) with overrides pointing at the discovery files, and when training ends or fails the server jobs are
cancelled. Every job requests its component's resources (GPUs, `--exclusive`, CPUs per task (also for its srun
step, via SRUN_CPUS_PER_TASK), memory, an optional pyxis container). A trainer job that reaches its time limit is
checkpointed by the trainer (submitit's pre-timeout signal -> SIGTERM -> checkpoint after the current step) and
requeued through `Checkpointable.checkpoint`, so the resubmitted job resumes from that checkpoint. submitit has no
heterogeneous
jobs, hence separate jobs. `--cluster local|debug` runs on this machine (LocalExecutor; debug runs the trainer
in-process with DebugExecutor, the servers still as local jobs).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import submitit

from megatron_camopd.config import load_spec
from megatron_camopd.config.run_sections import LauncherConfig, slurm_seconds
from megatron_camopd.config.serving import SlurmResources
from megatron_camopd.errors import TeacherError
from megatron_camopd.launch.protocol import healthy_servers, http_ok, register_address
from megatron_camopd.launch.servers import (
    BACKENDS,
    CONVERTED_MARKER,
    Component,
    ensure_hf,
    fill,
    launcher_of,
    server_components,
)

EXIT_REQUEUE = 75


def slurm_minutes(text: str) -> int:
    """Minutes in a Slurm time string (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`), rounded up."""
    return max(1, -(-slurm_seconds(text) // 60))


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the job process dies (no orphaned servers/trainers)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _trainer_preexec() -> None:
    """preexec_fn of torchrun: as `_die_with_parent`, and ignore submitit's USR2 timeout signal (Slurm sends it
    to every process of the step; the job process handles it through `TrainerJob.checkpoint`)."""
    _die_with_parent()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _prepare_model(model: str, hf_dir: str, first_task: bool, timeout_s: float) -> str:
    """The HF dir an SGLang server loads: the job's first task converts a camopd checkpoint (once), the others
    wait for its conversion."""
    if os.path.isfile(os.path.join(model, "config.json")):
        return model
    if first_task:
        return ensure_hf(model, hf_dir)
    deadline = time.monotonic() + timeout_s
    while not os.path.isfile(os.path.join(hf_dir, CONVERTED_MARKER)):
        if time.monotonic() > deadline:
            raise TeacherError(f"{model}: no HF conversion in {hf_dir} after {timeout_s:.0f}s")
        time.sleep(2)
    return hf_dir


class TeacherServer:
    """A submitit job body: the servers of a server group on this node (`per_node` of them: server i on port
    port + i and GPUs from i * gpus_per_server) until cancelled; each registered once healthy; the job fails when
    any of them exits."""

    def __init__(
        self,
        component: Component,
        addr_file: str,
        backend: str,
        python: str,
        health_timeout_s: float = 1800,
        health_check_timeout_s: float = 30.0,
        sglang_python: str | None = None,
        vllm_python: str | None = None,
    ) -> None:
        self.component, self.addr_file, self.backend, self.python = component, addr_file, backend, python
        self.health_timeout_s, self.health_check_timeout_s = health_timeout_s, health_check_timeout_s
        self.sglang_python = sglang_python or python
        self.vllm_python = vllm_python or python

    def __call__(self) -> int:
        c = self.component
        host = socket.gethostname()
        model = str(c.model)
        if self.backend == "sglang":
            first = submitit.JobEnvironment().global_rank == 0
            model = _prepare_model(model, str(c.hf_dir), first, self.health_timeout_s)
        procs, ports, readies = [], [], []
        for i in range(c.per_node):
            ready = f"{self.addr_file}.{host}.{os.getpid()}.{i}.ready"
            port = str(int(c.port or 0) + i) if self.backend == "sglang" else ""
            cmd = fill(
                c.argv,
                python=self.python,
                sglang_python=self.sglang_python,
                vllm_python=self.vllm_python,
                model=model,
                port=port or "0",
                ready=ready,
                base_gpu=str(i * c.gpus_per_server),
            )
            procs.append(subprocess.Popen(cmd, env={**os.environ, **c.env}, preexec_fn=_die_with_parent))  # noqa: PLW1509
            ports.append(port)
            readies.append(ready)
        name = f"{c.kind} {c.name}"
        deadline = time.monotonic() + self.health_timeout_s
        pending = set(range(c.per_node))
        try:
            while pending:
                for i in sorted(pending):
                    if procs[i].poll() is not None:
                        raise TeacherError(
                            f"{name} server {i} on {host} exited (rc={procs[i].returncode}) before it was healthy"
                        )
                    if not ports[i] and os.path.exists(readies[i]):
                        ports[i] = Path(readies[i]).read_text().strip().rpartition(":")[2]
                    if ports[i] and http_ok(f"http://{host}:{ports[i]}/health", self.health_check_timeout_s):
                        register_address(self.addr_file, f"{host}:{ports[i]}")
                        print(f"{name} serves {model} at {host}:{ports[i]}", flush=True)
                        pending.discard(i)
                if time.monotonic() > deadline:
                    raise TeacherError(
                        f"{name} on {host}: {len(pending)} server(s) not healthy after {self.health_timeout_s:.0f}s"
                    )
                time.sleep(0.5)
            while all(p.poll() is None for p in procs):
                time.sleep(1.0)
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            raise TeacherError(f"{name} server(s) on {host} exited: {failed}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()


def _master_addr(hostname: str) -> str:
    """The address of a Slurm node (its NodeAddr; the name itself on most clusters or off Slurm)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", hostname], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return hostname
    for word in out.stdout.split():
        if word.startswith("NodeAddr="):
            return word.split("=", 1)[1]
    return hostname


class TrainerJob(submitit.helpers.Checkpointable):
    """A submitit job body (one task per node): torchrun `camopd train`; requeued from its checkpoint on timeout."""

    def __init__(
        self,
        python: str,
        spec: str,
        overrides: list[str],
        nproc_per_node: int,
        shutdown_timeout_s: int = 240,
        workdir: str | None = None,
        env: dict | None = None,
    ) -> None:
        self.args = (
            python,
            spec,
            list(overrides),
            nproc_per_node,
            shutdown_timeout_s,
            workdir or os.getcwd(),
            dict(env or {}),
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self.args, "_proc": None}

    def __call__(self) -> int:
        python, spec, overrides, nproc, shutdown, workdir, extra_env = self.args
        env = submitit.JobEnvironment()
        hosts = env.hostnames if env.num_nodes > 1 else [socket.gethostname()]
        port = 20000 + int(str(env.job_id).split("_")[0]) % 20000
        # torch >= 2.6: the shutdown grace as TORCH_ELASTIC_SHUTDOWN_TIMEOUT (recent torch; older ones keep 30 s)
        # and signals to forward as TORCHELASTIC_SIGNALS_TO_HANDLE (the --shutdown-timeout/--signals-to-handle
        # flags do not exist in older torchrun)
        run_env = {
            **os.environ,
            **extra_env,
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown),
            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        }
        cmd = [
            python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={env.num_nodes}",
            f"--nproc-per-node={nproc}",
            f"--node-rank={env.node}",
            f"--master-addr={_master_addr(hosts[0])}",
            f"--master-port={port}",
            "-m",
            "megatron_camopd.cli",
            "train",
            spec,
            *overrides,
        ]
        self._proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=run_env,  # noqa: PLW1509 (no threads here)
            preexec_fn=_trainer_preexec,
        )
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


def slurm_parameters(launcher: LauncherConfig, nodes: int, gpus: int, res: SlurmResources, cpu: bool) -> dict:
    """submitit's `slurm_*` parameters of one component: resources, container, its srun's CPUs, environment."""
    params: dict[str, Any] = {"slurm_signal_delay_s": min(launcher.signal_lead_s, slurm_seconds(launcher.time) - 60)}
    if res.exclusive:
        params["slurm_exclusive"] = True
    if res.mem is not None:
        params["slurm_mem"] = res.mem
    if res.cpus_per_task is not None:
        params["slurm_cpus_per_task"] = res.cpus_per_task
    if launcher.partition:
        params["slurm_partition"] = launcher.partition
    if launcher.account:
        params["slurm_additional_parameters"] = {"account": launcher.account}
    if res.container_image:
        srun = [f"--container-image={res.container_image}", f"--container-workdir={os.getcwd()}"]
        if res.container_mounts:
            srun.append(f"--container-mounts={','.join(res.container_mounts)}")
        params["slurm_srun_args"] = srun
    cpus = str(res.cpus_per_task) if res.cpus_per_task is not None else "${SLURM_CPUS_ON_NODE:-1}"
    params["slurm_setup"] = [f"export SRUN_CPUS_PER_TASK={cpus}  # srun does not inherit --cpus-per-task"] + [
        f"export {k}={shlex.quote(v)}" for k, v in launcher.env.items()
    ]
    return params


def make_executor(
    cluster: str,
    folder: Path,
    name: str,
    launcher: LauncherConfig,
    nodes: int,
    gpus: int,
    cpu: bool,
    res: SlurmResources | None = None,
) -> Any:
    """A submitit executor for one job kind (a server group or the trainer)."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": slurm_minutes(launcher.time),
        "nodes": nodes,
        "tasks_per_node": 1,
    }
    if not cpu:
        params["gpus_per_node"] = gpus
    if cluster == "slurm":
        params.update(slurm_parameters(launcher, nodes, gpus, res or launcher.resources, cpu))
    executor.update_parameters(**params)
    return executor


def wait_for_teachers(
    addr_files: dict[str, str], jobs: list[Any], nodes: dict[str, int], timeout_s: float, check_timeout_s: float = 30.0
) -> None:
    """Until every discovery file lists its group's healthy servers; `TeacherError` if a job ends or time runs out."""
    from megatron_camopd.remote.discovery import read_discovery_file

    deadline = time.monotonic() + timeout_s
    for name, path in addr_files.items():
        while len(healthy_servers(path, check_timeout_s)) < nodes[name]:
            for job in jobs:
                if job.done():
                    raise TeacherError(
                        f"teacher job {job.job_id} ended before teacher {name} was healthy:\n{job.stderr() or ''}"
                    )
            if time.monotonic() > deadline:
                raise TeacherError(f"{name}: no {nodes[name]} healthy servers in {path} after {timeout_s:.0f}s")
            time.sleep(0.5)
        print(f"{name} ready: {', '.join(read_discovery_file(path))}", flush=True)


def launch_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="camopd launch", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (also passed to `camopd train`)")
    ap.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm")
    ap.add_argument("--cpu", action="store_true", help="no GPUs (implied by local/debug without CUDA)")
    ap.add_argument(
        "--server-backend",
        choices=BACKENDS,
        default="sglang",
        help="sglang: real SGLang servers (launcher.sglang_python; its CPU flags with --cpu); camopd: `camopd serve`",
    )
    ap.add_argument("--folder", help="submitit logs (default: <log dir>/submitit)")
    args = ap.parse_intermixed_args(argv)
    spec = load_spec(args.spec, args.overrides)
    launcher = launcher_of(spec)
    cpu = args.cpu or (args.cluster != "slurm" and not _has_cuda())
    if args.server_backend == "camopd" and not cpu:
        raise TeacherError("--server-backend camopd: `camopd serve` is the CPU stand-in; add --cpu")
    log_dir = Path(launcher.log_dir or os.path.join(spec.checkpoint.dir, "logs")).resolve()
    folder = Path(args.folder or log_dir / "submitit").resolve()
    discovery = log_dir / "discovery" / f"launch-{uuid.uuid4().hex[:8]}"
    discovery.mkdir(parents=True, exist_ok=True)
    python = launcher.python or sys.executable
    servers = server_components(spec, cpu=cpu, backend=args.server_backend)
    server_cluster = "local" if args.cluster == "debug" else args.cluster
    addr_files = {c.name: str(discovery / f"{c.name}.addr") for c in servers}
    jobs: list[Any] = []
    try:
        for c in servers:
            ex = make_executor(
                server_cluster, folder, f"{spec.name}-{c.name}", launcher, c.nodes, c.gpus_per_node, cpu, c.resources
            )
            body = TeacherServer(
                c,
                addr_files[c.name],
                args.server_backend,
                python,
                launcher.health_timeout_s,
                launcher.health_check_timeout_s,
                sglang_python=launcher.sglang_python,
                vllm_python=launcher.vllm_python,
            )
            jobs.append(ex.submit(body))
            print(f"{c.kind} {c.name}: job {jobs[-1].job_id}", flush=True)
        wait_for_teachers(
            addr_files,
            jobs,
            {c.name: c.count for c in servers},
            launcher.health_timeout_s,
            launcher.health_check_timeout_s,
        )
        overrides = list(args.overrides)
        for c in servers:
            overrides += fill(c.overrides, addr=addr_files[c.name])
        ex = make_executor(args.cluster, folder, spec.name, launcher, launcher.nodes, launcher.gpus_per_node, cpu)
        trainer = ex.submit(
            TrainerJob(
                python,
                os.path.abspath(args.spec),
                overrides,
                launcher.gpus_per_node,
                launcher.shutdown_timeout_s,
                env=launcher.trainer_env,
            )
        )
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
