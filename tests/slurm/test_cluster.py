"""The local Slurm cluster behaves like the real clusters our launchers target.

Each test submits real jobs: plain sbatch with accounting, a 2-node allocation, a hetjob whose components meet
through an atomically written discovery file, a submitit job, and a requeue driven by a pre-timeout signal.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm


def _script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_sbatch_job_completes_and_writes_its_output(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    script = _script(
        tmp_path / "job.sh",
        """
        #!/bin/bash
        echo "job=$SLURM_JOB_ID partition=$SLURM_JOB_PARTITION sum=$((6 * 7))"
    """,
    )
    job_id = slurm_cluster.sbatch("-o", str(out), str(script))
    assert slurm_cluster.wait(job_id) == "COMPLETED"
    assert out.read_text() == f"job={job_id} partition=debug sum=42\n"
    fields = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode").stdout
    assert fields.strip() == f"{job_id}|COMPLETED|0:0"


def test_failing_job_is_reported_failed(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.sbatch("-o", str(tmp_path / "fail.out"), "--wrap", "exit 3")
    assert slurm_cluster.wait(job_id) == "FAILED"
    exit_code = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "ExitCode").stdout.strip()
    assert exit_code == "3:0"


def test_two_node_job_sees_both_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    hosts, steps = tmp_path / "hosts.txt", tmp_path / "steps.txt"
    script = _script(
        tmp_path / "two.sh",
        f"""
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 -o {tmp_path}/two.out
        scontrol show hostnames "$SLURM_JOB_NODELIST" > {hosts}
        srun bash -c 'echo "$SLURM_PROCID $SLURMD_NODENAME"' | sort > {steps}
    """,
    )
    job_id = slurm_cluster.sbatch(str(script))
    assert slurm_cluster.wait(job_id) == "COMPLETED", (tmp_path / "two.out").read_text()
    assert hosts.read_text().split() == ["n1", "n2"]
    assert steps.read_text().splitlines() == ["0 n1", "1 n2"]


SERVER = """
import http.server, os, socket, sys
from pathlib import Path
discovery = Path(sys.argv[1])
node = os.environ["SLURMD_NODENAME"]
class Reply(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"served-by={node} het-group=0".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer((socket.gethostname(), 0), Reply)
tmp = discovery.with_suffix(".tmp")
tmp.write_text(f"{socket.gethostname()}:{server.server_address[1]}")
os.replace(tmp, discovery)  # atomic: the reader never sees a partial address
server.handle_request()
"""

CLIENT = """
import os, sys, time, urllib.request
from pathlib import Path
discovery, result = Path(sys.argv[1]), Path(sys.argv[2])
deadline = time.monotonic() + 30
while not discovery.exists():
    if time.monotonic() > deadline:
        sys.exit("no discovery file")
    time.sleep(0.05)
address = discovery.read_text()
reply = urllib.request.urlopen(f"http://{address}/", timeout=10).read().decode()
result.write_text(f"{reply} client={os.environ['SLURMD_NODENAME']}")
"""


def test_hetjob_components_meet_through_discovery_file(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    server, client = tmp_path / "server.py", tmp_path / "client.py"
    server.write_text(SERVER)
    client.write_text(CLIENT)
    discovery, result = tmp_path / "discovery.addr", tmp_path / "result.txt"
    script = _script(
        tmp_path / "het.sh",
        f"""
        #!/bin/bash
        #SBATCH --nodes=1 --ntasks=1 -o {tmp_path}/het.out
        #SBATCH hetjob
        #SBATCH --nodes=1 --ntasks=1
        srun --het-group=0 {sys.executable} {server} {discovery} &
        srun --het-group=1 {sys.executable} {client} {discovery} {result}
        wait
    """,
    )
    job_id = slurm_cluster.sbatch(str(script))
    assert slurm_cluster.wait(job_id, components=2) == "COMPLETED", (tmp_path / "het.out").read_text()
    host, port = discovery.read_text().rsplit(":", 1)
    assert host == socket.gethostname() and int(port) > 0
    served_by, group, client_node = result.read_text().split()
    assert group == "het-group=0"
    assert {served_by.split("=")[1], client_node.split("=")[1]} == {"n1", "n2"}
    components = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State").stdout.split()
    assert components == [f"{job_id}+0|COMPLETED", f"{job_id}+1|COMPLETED"]


def test_submitit_job_returns_its_result(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", nodes=2, tasks_per_node=1, cpus_per_task=1)

    def rank_report(x: int) -> tuple[str, str, int]:
        return os.environ["SLURMD_NODENAME"], os.environ["SLURM_PROCID"], x * x

    job = executor.submit(rank_report, 7)
    results = job.results()
    assert sorted(results) == [("n1", "0", 49), ("n2", "1", 49)]
    assert slurm_cluster.wait(job.job_id) == "COMPLETED"
    assert job.get_info(mode="force")["State"] == "COMPLETED"  # submitit reads this from sacct


def test_signal_before_time_limit_requeues_the_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """USR1 arrives before the 1-minute limit (checked every ~30 s); the job requeues itself and reruns."""
    out = tmp_path / "requeue.out"
    script = _script(
        tmp_path / "requeue.sh",
        f"""
        #!/bin/bash
        #SBATCH --time=1 --signal=B:USR1@50 --requeue --open-mode=append -o {out}
        echo "run restart_count=${{SLURM_RESTART_COUNT:-0}}"
        if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo done; exit 0; fi
        trap 'echo got-USR1; kill "$sleeper"; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
        sleep 300 &  # proctrack/linuxproc loses children orphaned by the shell's exit: kill it in the trap
        sleeper=$!
        wait
    """,
    )
    job_id = slurm_cluster.sbatch(str(script))
    assert slurm_cluster.wait(job_id, timeout=90) == "COMPLETED", out.read_text()
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("slurmstepd")]  # daemon noise
    assert lines == ["run restart_count=0", "got-USR1", "run restart_count=1", "done"]
    runs = slurm_cluster.run("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State").stdout.split()
    assert runs == ["REQUEUED", "COMPLETED"]
