"""Replica discovery: a launcher writes `host:port` lines (atomically: temp file + rename) to a shared file; the
client waits for it with a timeout and turns each line into a base URL. Used when teachers run as separate Slurm
jobs/het-job components whose ports are only known once they listen."""

from __future__ import annotations

import os
import time

from ..errors import TeacherError


def parse_discovery_text(text: str, where: str) -> list[str]:
    """Base URLs from `host:port` / `http(s)://host:port` lines; blank lines and `#` comments are ignored."""
    urls: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        url = line if line.startswith(("http://", "https://")) else f"http://{line}"
        host_port = url.split("://", 1)[1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise TeacherError(f"{where}:{lineno}: expected host:port, got {raw.strip()!r}")
        if url.rstrip("/") not in urls:
            urls.append(url.rstrip("/"))
    return urls


def read_discovery_file(path: str) -> list[str]:
    """The URLs currently listed in `path` (empty when the file does not exist yet)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return parse_discovery_text(text, path)


def wait_for_discovery(path: str, timeout_s: float, poll_s: float = 0.1) -> list[str]:
    """Wait until `path` lists at least one replica; `TeacherError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = read_discovery_file(path)
        if urls:
            return urls
        if time.monotonic() >= deadline:
            state = "is empty" if os.path.exists(path) else "does not exist"
            raise TeacherError(f"teacher discovery file {path} {state} after {timeout_s:.0f}s (launcher not ready?)")
        time.sleep(poll_s)
