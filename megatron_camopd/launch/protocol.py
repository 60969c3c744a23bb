"""The launch protocol between servers and trainers, in one place for both launchers.

A server publishes `host:port` in its group's discovery file once its `/health` answers (appended under a lock,
published atomically: temp file + rename); a group is ready when its file lists as many healthy servers as it has
nodes; a trainer (or its watchdog) counts a group's healthy servers the same way while training. The sbatch scripts
(templates/lib.sh) call this module's command line for each of these steps (`register`, `healthy`, `health`), and
`camopd launch` (launch/submit.py) calls the same functions, so the file format (remote/discovery.py) and what
"healthy" means are written once.

Healthy (ready to serve) is `/health` answering 200: SGLang's generating health check. Alive is weaker, and is what
the watchdog asks while training: `/health`, or else `/model_info` answering -- a server paused for a weight sync
fails its generating health check (it waits for the pause and answers 503 after 20 s) but answers `/model_info`;
a dead server answers neither (SGLang takes its whole process tree down when its scheduler dies).

    python -m megatron_camopd.launch.protocol register FILE HOST:PORT
    python -m megatron_camopd.launch.protocol healthy FILE [--timeout S]   # prints the number of healthy servers
    python -m megatron_camopd.launch.protocol alive FILE [--timeout S]     # ... of live servers (paused included)
    python -m megatron_camopd.launch.protocol health URL [--timeout S]     # exit 0 when URL answers 2xx
    python -m megatron_camopd.launch.protocol lib-path                     # the shared bash functions to `source`
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import urllib.request
from pathlib import Path

from megatron_camopd.errors import TeacherError
from megatron_camopd.remote.discovery import read_discovery_file

LIB_SH = Path(__file__).with_name("templates") / "lib.sh"


def http_ok(url: str, timeout: float = 30.0) -> bool:
    """True when `url` answers 2xx within `timeout` seconds (SGLang's /health runs a one-token generation)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def register_address(path: str, address: str) -> None:
    """Append `address` to the discovery file under a lock, publishing it atomically (temp file + rename)."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = Path(path).read_text() if os.path.exists(path) else ""
        tmp = f"{path}.tmp.{os.getpid()}"
        Path(tmp).write_text(old + f"{address}\n")
        os.replace(tmp, path)


def healthy_servers(path: str, timeout: float = 30.0) -> list[str]:
    """The servers listed in the discovery file `path` whose `/health` answers (none while it does not exist)."""
    return [url for url in read_discovery_file(path) if http_ok(f"{url}/health", timeout)]


def alive_servers(path: str, timeout: float = 30.0) -> list[str]:
    """The servers listed in `path` that are alive: healthy, or answering `/model_info` (paused for a sync)."""
    return [
        url
        for url in read_discovery_file(path)
        if http_ok(f"{url}/health", timeout) or http_ok(f"{url}/model_info", timeout)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_camopd.launch.protocol", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="publish HOST:PORT in a discovery file")
    reg.add_argument("file")
    reg.add_argument("address")
    count = sub.add_parser("healthy", help="print how many servers of a discovery file are healthy")
    count.add_argument("file")
    count.add_argument("--timeout", type=float, default=30.0)
    live = sub.add_parser("alive", help="print how many servers of a discovery file are alive (paused ones too)")
    live.add_argument("file")
    live.add_argument("--timeout", type=float, default=30.0)
    one = sub.add_parser("health", help="exit 0 when URL answers 2xx")
    one.add_argument("url")
    one.add_argument("--timeout", type=float, default=30.0)
    sub.add_parser("lib-path", help="print the path of the shared bash functions of the sbatch scripts")
    args = ap.parse_args(argv)
    if args.cmd == "register":
        register_address(args.file, args.address)
    elif args.cmd in ("healthy", "alive"):
        counter = healthy_servers if args.cmd == "healthy" else alive_servers
        try:
            print(len(counter(args.file, args.timeout)))
        except TeacherError as exc:  # a malformed line: say which, count nothing
            print(f"camopd: {exc}", file=sys.stderr)
            print(0)
    elif args.cmd == "health":
        return 0 if http_ok(args.url, args.timeout) else 1
    else:
        print(LIB_SH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
