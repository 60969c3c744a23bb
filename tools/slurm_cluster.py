#!/usr/bin/env python3
"""A real, private Slurm cluster on loopback (two virtual nodes) for tests and by-hand experiments.

Why: the launchers (sbatch scripts, hetjobs, submitit, requeue on time limit) must be tested against a real
Slurm, not mocks. Debian 12's Slurm 22.05 runs without systemd when each daemon is started directly, and its
build supports several slurmd on one host, so two virtual nodes ``n1``/``n2`` on 127.0.0.1 give working
multi-node jobs and hetjobs. ``sacct`` (needed by submitit) needs slurmdbd + a database, so a private MariaDB
runs on 127.0.0.1 too. Every file (configs, munge key and socket, database, spool, logs, pid files) lives under
one directory DIR; daemons are stopped by the pid files written there, never by process name.

Usage by hand (root, Debian 12)::

    python tools/slurm_cluster.py install                 # apt-get the packages (idempotent)
    python tools/slurm_cluster.py start --dir /tmp/slurm && export SLURM_CONF=/tmp/slurm/slurm.conf
    sbatch --wrap 'hostname' && squeue && sacct
    python tools/slurm_cluster.py status --dir /tmp/slurm
    eval "$(python tools/slurm_cluster.py env --dir /tmp/slurm)"   # prints `export SLURM_CONF=...`
    python tools/slurm_cluster.py stop --dir /tmp/slurm

Keep DIR short (unix socket paths are limited to ~107 bytes) and traversable by the ``munge`` and ``mysql``
users (``start`` makes DIR mode 0755 but not its parents). Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
NODES = ("n1", "n2")
CLUSTER_NAME = "camopd"
PARTITION = "debug"
# Stop order: compute daemons first, the database last. Values: expected executable-name prefix.
DAEMONS = {
    "slurmd-n1": "slurmd",
    "slurmd-n2": "slurmd",
    "slurmctld": "slurmctld",
    "slurmdbd": "slurmdbd",
    "munged": "munged",
    "mariadbd": "mariadbd",
}


class ClusterError(RuntimeError):
    """The cluster could not be installed, started or stopped; the message carries the daemon log tails."""


@dataclass(frozen=True)
class Ports:
    """TCP ports on 127.0.0.1, one per listening daemon (slurmd ports are per virtual node)."""

    mysql: int
    slurmdbd: int
    slurmctld: int
    n1: int
    n2: int


class Layout:
    """Every path of one cluster, all under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.slurm_conf = self.root / "slurm.conf"
        self.dbd_conf = self.root / "slurmdbd.conf"
        self.state = self.root / "cluster.json"
        self.run = self.root / "run"
        self.log = self.root / "log"
        self.spool = self.root / "spool"
        self.munge = self.root / "munge"
        self.munge_key = self.munge / "munge.key"
        self.munge_socket = self.munge / "munge.socket"
        self.mysql = self.root / "mysql"
        self.mysql_data = self.mysql / "data"
        self.mysql_socket = self.mysql / "mysqld.sock"

    def pid_file(self, daemon: str) -> Path:
        if daemon == "munged":
            return self.munge / "munged.pid"
        if daemon == "mariadbd":
            return self.mysql / "mariadbd.pid"
        return self.run / f"{daemon}.pid"

    def logs(self) -> list[Path]:
        return [*sorted(self.log.glob("*.log")), self.munge / "munged.log", self.mysql / "mariadbd.err"]


# ----------------------------------------------------------------------------------------------- helpers
def _run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 120,
    input_text: str | None = None,
    user: str | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        check=False,
        env=env,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        user=user,
        group=user,
        extra_groups=[] if user else None,
    )
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def _free_ports(count: int) -> list[int]:
    """Distinct currently-free loopback ports (all held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, exe_prefix: str) -> bool:
    """True when ``pid`` runs (not a zombie) and its executable name starts with ``exe_prefix``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and exe.startswith(exe_prefix)


def _wait_for(what: str, predicate, timeout: float, layout: Layout) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{log_tails(layout)}")


def log_tails(layout: Layout, lines: int = 30) -> str:
    """The last ``lines`` lines of every daemon log, for error messages."""
    parts = []
    for path in layout.logs():
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {path} <==\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no daemon logs under {layout.root})"


def client_env(root: Path) -> dict[str, str]:
    """Environment variables a Slurm client (sbatch, sacct, submitit) needs to talk to this cluster."""
    return {"SLURM_CONF": str(Layout(root).slurm_conf)}


def _daemon_env(layout: Layout) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(client_env(layout.root))
    return env


# ----------------------------------------------------------------------------------------------- install
def install() -> None:
    """apt-get install the Debian packages when any is missing (quiet, idempotent; needs root)."""
    missing = [
        p
        for p in PACKAGES
        if _run(["dpkg-query", "-W", "-f=${Status}", p], check=False).stdout != "install ok installed"
    ]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=900)


# ----------------------------------------------------------------------------------------------- configs
def _slurm_conf(layout: Layout, ports: Ports, cpus: int, mem_mb: int) -> str:
    host = socket.gethostname().split(".")[0]
    munge_auth = f"socket={layout.munge_socket}"
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={getattr(ports, n)} CPUs={cpus} "
        f"RealMemory={mem_mb} State=UNKNOWN"
        for n in NODES
    )
    return f"""# Generated by tools/slurm_cluster.py: a private two-node cluster on loopback.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports.slurmctld}
SlurmdPort={ports.n1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo={munge_auth},cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={layout.spool}/ctld
SlurmdSpoolDir={layout.spool}/%n
SlurmctldPidFile={layout.pid_file("slurmctld")}
SlurmdPidFile={layout.run}/slurmd-%n.pid
SlurmctldLogFile={layout.log}/slurmctld.log
SlurmdLogFile={layout.log}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=1,bf_hetjob_immediate
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
MessageTimeout=10
SlurmdTimeout=60
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports.slurmdbd}
# Slurm clients take the munge socket for slurmdbd connections from here, not from AuthInfo.
AccountingStoragePass={layout.munge_socket}
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _dbd_conf(layout: Layout, ports: Ports, password: str) -> str:
    return f"""# Generated by tools/slurm_cluster.py
AuthType=auth/munge
AuthInfo=socket={layout.munge_socket}
DbdHost={socket.gethostname().split(".")[0]}
DbdAddr=127.0.0.1
DbdPort={ports.slurmdbd}
SlurmUser=root
LogFile={layout.log}/slurmdbd.log
PidFile={layout.pid_file("slurmdbd")}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports.mysql}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


# ----------------------------------------------------------------------------------------------- daemons
def _start_mariadb(layout: Layout, ports: Ports, password: str) -> None:
    layout.mysql.mkdir(mode=0o755, exist_ok=True)
    _chown(layout.mysql, "mysql")
    if not (layout.mysql_data / "mysql").is_dir():
        _run(
            [
                "mariadb-install-db",
                "--no-defaults",
                "--user=mysql",
                f"--datadir={layout.mysql_data}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                "--skip-name-resolve",
            ],
            timeout=300,
        )
    args = [
        "mariadbd",
        "--no-defaults",
        "--user=mysql",
        f"--datadir={layout.mysql_data}",
        f"--socket={layout.mysql_socket}",
        f"--pid-file={layout.pid_file('mariadbd')}",
        f"--port={ports.mysql}",
        "--bind-address=127.0.0.1",
        "--skip-name-resolve",
        "--skip-log-bin",
        f"--log-error={layout.mysql / 'mariadbd.err'}",
        f"--tmpdir={layout.mysql}",
        "--innodb-buffer-pool-size=64M",
        "--innodb-lock-wait-timeout=900",
    ]
    server = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    client = ["mariadb", "--no-defaults", f"--socket={layout.mysql_socket}", "-uroot"]

    def ready() -> bool:
        if server.poll() is not None:
            raise ClusterError(f"mariadbd exited with rc={server.returncode}\n{log_tails(layout)}")
        return _run([*client, "-e", "SELECT 1"], check=False).returncode == 0

    _wait_for("mariadbd", ready, 60, layout)
    users = ("'slurm'@'127.0.0.1'", "'slurm'@'localhost'")
    sql = "CREATE DATABASE IF NOT EXISTS slurm_acct_db;\n" + "".join(
        f"CREATE OR REPLACE USER {u} IDENTIFIED BY '{password}';\nGRANT ALL ON slurm_acct_db.* TO {u};\n" for u in users
    )
    _run(client, input_text=sql)


def _start_munge(layout: Layout) -> None:
    layout.munge.mkdir(exist_ok=True)
    layout.munge.chmod(0o755)  # clients of any user must reach the socket
    _chown(layout.munge, "munge")
    if not layout.munge_key.exists():
        layout.munge_key.write_bytes(secrets.token_bytes(1024))
    layout.munge_key.chmod(0o400)
    for path in layout.munge.iterdir():
        _chown(path, "munge")
    _run(
        [
            "munged",
            "--force",
            f"--socket={layout.munge_socket}",
            f"--key-file={layout.munge_key}",
            f"--pid-file={layout.pid_file('munged')}",
            f"--log-file={layout.munge / 'munged.log'}",
            f"--seed-file={layout.munge / 'munged.seed'}",
        ],
        timeout=30,
        user="munge",
    )
    _wait_for("munged", lambda: layout.munge_socket.exists(), 20, layout)


def _sacctmgr(layout: Layout, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(["sacctmgr", "-i", *args], env=_daemon_env(layout), check=False, timeout=30)


def _nodes_idle(layout: Layout) -> bool:
    out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=_daemon_env(layout), check=False, timeout=15).stdout
    states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return all(states.get(n) == "idle" for n in NODES)


def _sacct_works(layout: Layout) -> bool:
    return _run(["sacct", "-n", "-X", "-a"], env=_daemon_env(layout), check=False, timeout=15).returncode == 0


def _start_slurm(layout: Layout) -> None:
    env = _daemon_env(layout)
    _run(["slurmdbd"], env=env, timeout=60)
    _wait_for("slurmdbd", lambda: _sacctmgr(layout, "show", "cluster").returncode == 0, 60, layout)
    if CLUSTER_NAME not in _sacctmgr(layout, "-n", "-P", "show", "cluster", "format=cluster").stdout.split():
        for cmd in (
            ["add", "cluster", CLUSTER_NAME],
            ["add", "account", "default", f"cluster={CLUSTER_NAME}", "description=tests", "org=tests"],
            ["add", "user", "root", "account=default", f"cluster={CLUSTER_NAME}"],
        ):
            proc = _sacctmgr(layout, *cmd)
            if proc.returncode != 0:
                raise ClusterError(f"sacctmgr {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    _run(["slurmctld", "-f", str(layout.slurm_conf)], env=env, timeout=60)
    for node in NODES:
        _run(["slurmd", "-f", str(layout.slurm_conf), "-N", node], env=env, timeout=60)
    _wait_for("both nodes idle in sinfo", lambda: _nodes_idle(layout), 60, layout)
    _wait_for("sacct", lambda: _sacct_works(layout), 30, layout)


# ----------------------------------------------------------------------------------------------- commands
def status(root: Path) -> dict[str, int | None]:
    """Map each daemon to its pid when it runs, else None."""
    layout = Layout(root)
    result: dict[str, int | None] = {}
    for daemon, exe in DAEMONS.items():
        pid = _read_pid(layout.pid_file(daemon))
        result[daemon] = pid if pid is not None and _alive(pid, exe) else None
    return result


def start(root: Path, *, port_base: int | None = None, cpus: int | None = None) -> None:
    """Start (or, when already fully running, keep) the cluster under ``root``; return once jobs can run."""
    layout = Layout(root)
    running = status(root)
    if all(running.values()):
        return
    if any(running.values()):
        raise ClusterError(f"a partial cluster runs under {root} ({running}); run `stop --dir {root}` first")
    if len(str(layout.munge_socket)) > 100 or len(str(layout.mysql_socket)) > 100:
        raise ClusterError(f"--dir {root} is too long for unix socket paths; use a shorter directory")
    for d in (layout.root, layout.run, layout.log, layout.spool, *(layout.spool / n for n in NODES)):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    if layout.state.exists():  # restart in place: keep ports and database password
        saved = json.loads(layout.state.read_text())
        ports, password = Ports(**saved["ports"]), saved["password"]
    else:
        values = list(range(port_base, port_base + 5)) if port_base else _free_ports(5)
        ports, password = Ports(*values), secrets.token_hex(12)
        _write(layout.state, json.dumps({"ports": asdict(ports), "password": password}, indent=1), 0o600)
    ncpu = cpus or max(2, len(os.sched_getaffinity(0)))
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    _write(layout.slurm_conf, _slurm_conf(layout, ports, ncpu, mem_mb))
    _write(layout.dbd_conf, _dbd_conf(layout, ports, password), 0o600)
    try:
        _start_mariadb(layout, ports, password)
        _start_munge(layout)
        _start_slurm(layout)
    except (ClusterError, subprocess.TimeoutExpired) as exc:
        message = str(exc) if isinstance(exc, ClusterError) else f"{exc}\n{log_tails(layout)}"
        stop(root)
        raise ClusterError(f"starting the Slurm cluster under {root} failed: {message}") from None


def _cancel_jobs(layout: Layout) -> None:
    """Cancel every job of this cluster so no slurmstepd outlives its slurmd."""
    env = _daemon_env(layout)
    if _run(["scancel", "--partition", PARTITION], env=env, check=False, timeout=15).returncode != 0:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = _run(["squeue", "-h", "-o", "%i"], env=env, check=False, timeout=15)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(0.5)


def stop(root: Path, grace: float = 20) -> None:
    """Stop exactly the daemons this tool started under ``root`` (by their pid files); SIGKILL after ``grace``."""
    layout = Layout(root)
    running = status(root)
    if running["slurmctld"]:
        _cancel_jobs(layout)
    for daemon, pid in running.items():
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace
        while _alive(pid, DAEMONS[daemon]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, DAEMONS[daemon]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _alive(pid, DAEMONS[daemon]):
                time.sleep(0.1)
        layout.pid_file(daemon).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install the Slurm/munge/MariaDB packages if missing")
    for name in ("start", "status", "stop", "env"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True, type=Path, help="directory holding all cluster state")
        if name == "start":
            p.add_argument("--port-base", type=int, default=None, help="use ports BASE..BASE+4 (default: free)")
            p.add_argument("--cpus", type=int, default=None, help="CPUs per virtual node (default: max(2, nproc))")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install()
        elif args.command == "start":
            install()
            start(args.dir, port_base=args.port_base, cpus=args.cpus)
            print(f"Slurm cluster up under {args.dir}; export SLURM_CONF={Layout(args.dir).slurm_conf}")
        elif args.command == "status":
            running = status(args.dir)
            for daemon, pid in running.items():
                print(f"{daemon:10s} {'running pid ' + str(pid) if pid else 'stopped'}")
            return 0 if all(running.values()) else 1
        elif args.command == "stop":
            stop(args.dir)
        else:
            for key, value in client_env(args.dir).items():
                print(f"export {key}={value}")
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
