"""Separately started servers (``paramsel serve``, the bare echo server) and their memory figures."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_PARAMSEL = re.compile(r"paramsel serving on (\S+):(\d+)")
_ECHO = re.compile(r"echo serving on (\S+):(\d+)")


@dataclass(frozen=True)
class Server:
    pid: int
    target: str


def _drain(stream: object, lines: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.append(line)
        del lines[:-50]


@contextmanager
def _process(cmd: list[str], announce: re.Pattern[str]) -> Iterator[Server]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            match = announce.search(line)
            if match:
                break
        else:
            raise RuntimeError(f"{cmd[2]} exited with {proc.wait()} before announcing: {''.join(tail)}")
        # Keep reading its output so that a chatty server never blocks on a full pipe.
        threading.Thread(target=_drain, args=(proc.stdout, tail), daemon=True).start()
        yield Server(proc.pid, f"{match.group(1)}:{match.group(2)}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def paramsel_serve() -> AbstractContextManager[Server]:
    """``paramsel serve --port 0`` as its own process."""
    cmd = [sys.executable, "-m", "paramsel.server.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    return _process(cmd, _PARAMSEL)


def echo_serve() -> AbstractContextManager[Server]:
    """The bare gRPC echo server (benchmarks.echo_server) as its own process."""
    return _process([sys.executable, "-m", "benchmarks.echo_server"], _ECHO)


def status_kib(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """Peak RSS of a process over a block, above its RSS when the block began (bytes).

    Resets the kernel's high-water mark (``echo 5 > /proc/PID/clear_refs``), then reads VmHWM after.
    """

    def __init__(self, pid: int | str) -> None:
        self.pid = pid
        self.idle = 0
        self.peak = 0

    def __enter__(self) -> PeakRss:
        self.idle = status_kib(self.pid, "VmRSS") * 1024
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = status_kib(self.pid, "VmHWM") * 1024

    @property
    def above_idle(self) -> int:
        return self.peak - self.idle


class MachineMemory:
    """Samples the machine's used memory (MemTotal - MemAvailable) in a thread; ``peak`` is the most seen."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.peak = 0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def used() -> int:
        fields: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields["MemTotal"] - fields["MemAvailable"]

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self.used())

    def __enter__(self) -> MachineMemory:
        self.peak = self.used()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
