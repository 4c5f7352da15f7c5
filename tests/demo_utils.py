"""What the demo tests share: a free port, a demo started as a user starts it (a subprocess) and
asked through gradio_client, and the processes it leaves (read from /proc)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_demo(argv: Sequence[str], port: int, log: Path, timeout_s: float = 120, env=None):
    """Start ``argv`` in the repo root (output into ``log``) and wait until its page at ``port``
    answers; returns (the process, a gradio_client ``Client``). Fails the test with the demo's
    output when it exits or does not answer in time."""
    from gradio_client import Client

    out = open(log, "w")
    server = subprocess.Popen(list(argv), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
    out.close()
    deadline = time.time() + timeout_s
    while True:
        try:
            return server, Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:
            if server.poll() is not None or time.time() > deadline:
                stop_demo(server)
                pytest.fail(f"the demo did not start: {Path(log).read_text()}")
            time.sleep(1)


def stop_demo(server: subprocess.Popen, timeout_s: float = 30) -> Optional[int]:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    return server.returncode


def _stat(pid: int) -> Optional[List[str]]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from the state on (the name may hold spaces)


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> List[int]:
    """Every live process below ``pid``."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [p for p in found if is_running(p)]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` in clock ticks."""
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12])


def wait_gone(pids: Sequence[int], timeout_s: float) -> List[int]:
    """Wait until none of ``pids`` runs; the ones still running after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        left = [p for p in pids if is_running(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)
