"""Child processes of the GPU check: a free port, a process whose output lines are logged as they come, one
line for an exception."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

try:
    import numpy as np
except ImportError:  # reported by no_gpu_reason with the rest of what is missing
    np = None

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output lines are kept (and logged to a file) as they come."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        self.t0 = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.log.write(line)
            self.log.flush()
            self.out.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next output line; '' when none came within `timeout`; None at the end of the output."""
        try:
            return self.lines.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            return ""

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            rc = self.p.wait()
        self.reader.join(timeout=5)
        self.log.close()
        return rc

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def tail(self, n: int = 3) -> str:
        return " / ".join(x.strip() for x in self.out[-n:] if x.strip())


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float, Proc]:
    p = Proc(cmd, log, env)
    rc = p.wait(timeout)
    return rc, p.seconds(), p


def error_line(e: BaseException) -> str:
    first = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
