"""``paramsel demo``: the service, the coordinator and the clients as processes on loopback gRPC.

Starts ``paramsel serve --port 0`` (unless ``$PARAMSEL_TARGET`` names a service), then
``paramsel demo-coordinator --port 0``, then one ``paramsel demo-client`` per client; shows a progress
bar fed by the coordinator's ``Progress`` call; and prints the table of the figures the coordinator
wrote. Every process it started is stopped when it returns, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import ExitStack
from pathlib import Path

import grpc

from paramsel.demo.protocol import CoordinatorStub, DemoConfig
from paramsel.demo.report import FIGURES_FILE, PLOT_FILE, format_table, summary

ENV_TARGET = "PARAMSEL_TARGET"  # paramsel.client.ENV_TARGET, without importing the SDK (and torch) here
_SERVE_ANNOUNCE = re.compile(r"paramsel serving on (\S+):(\d+)")
_COORDINATOR_ANNOUNCE = re.compile(r"paramsel demo coordinator on (\S+):(\d+)")
_STARTUP_SECONDS = 120.0


class DemoError(Exception):
    """The demo cannot go on; the message says why and shows the culprit's last output."""


class _Child:
    """A process of the demo, its merged stdout/stderr kept (last lines) by a draining thread."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], announce: re.Pattern[str] | None = None
    ):
        self.name = name
        self.lines: deque[str] = deque(maxlen=60)
        self.address: str | None = None
        self._announce = announce
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paramsel.server.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._thread = threading.Thread(target=self._drain, name=f"drain {name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._announce is not None and self.address is None:
                match = self._announce.search(line)
                if match:
                    self.address = f"{match.group(1)}:{match.group(2)}"
                    self._ready.set()
        self._ready.set()

    def wait_address(self, timeout: float) -> str:
        """The ``host:port`` the process announced."""
        self._ready.wait(timeout)
        if self.address is None:
            state = f"exited with {self.proc.poll()}" if self.proc.poll() is not None else "did not announce"
            raise DemoError(f"{self.name} {state} its address within {timeout:g} s\n{self.tail()}")
        return self.address

    def failed(self) -> bool:
        code = self.proc.poll()
        return code is not None and code != 0

    def tail(self) -> str:
        self._thread.join(timeout=1.0)
        lines = list(self.lines)[-25:]
        return (
            f"--- last output of {self.name} ---\n" + "\n".join(lines)
            if lines
            else f"({self.name}: no output)"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(timeout=5.0)


def _stop_all(children: list[_Child]) -> None:
    """Stops the processes in the reverse order of their start (the service last)."""
    for child in reversed(children):
        child.stop()


def _run_args(config: DemoConfig) -> list[str]:
    return [
        f"--rounds={config.rounds}",
        f"--sparsity={config.sparsity!r}",
        f"--criterion={config.criterion}",
        f"--seed={config.seed}",
        "--dense-baseline" if config.dense_baseline else "--no-dense-baseline",
        f"--local-epochs={config.local_epochs}",
        f"--skew={config.skew!r}",
        f"--norm-threshold={config.norm_threshold!r}",
    ]


def run_demo(config: DemoConfig, *, out: Path, timeout: float) -> int:
    """The whole demo; 0 when every process finished and the figures are written."""
    from tqdm import tqdm

    started = time.monotonic()
    out = out.resolve()
    env = dict(os.environ)
    client_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    children: list[_Child] = []
    with ExitStack() as stack:
        stack.callback(_stop_all, children)
        try:
            target = env.get(ENV_TARGET)
            if target:
                print(f"using the paramsel service at {target} (${ENV_TARGET})", flush=True)
            else:
                service = _Child(
                    "paramsel serve",
                    ["serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                    env,
                    _SERVE_ANNOUNCE,
                )
                children.append(service)
                target = service.wait_address(_STARTUP_SECONDS)
                print(f"paramsel serve is up at {target}", flush=True)
            coordinator = _Child(
                "paramsel demo-coordinator",
                [
                    "demo-coordinator",
                    "--host=127.0.0.1",
                    "--port=0",
                    f"--clients={config.clients}",
                    *_run_args(config),
                    f"--target={target}",
                    f"--out={out}",
                    f"--timeout={timeout!r}",
                ],
                env,
                _COORDINATOR_ANNOUNCE,
            )
            children.append(coordinator)
            address = coordinator.wait_address(_STARTUP_SECONDS)
            clients = []
            for index in range(config.clients):
                client = _Child(
                    f"paramsel demo-client {index}",
                    [
                        "demo-client",
                        f"--index={index}",
                        f"--clients={config.clients}",
                        f"--coordinator={address}",
                        f"--target={target}",
                    ],
                    client_env,
                )
                children.append(client)
                clients.append(client)
            print(
                f"coordinator at {address}; {config.clients} clients, {config.rounds} rounds, "
                f"runs: {', '.join(config.describe(run) for run in config.runs)}",
                flush=True,
            )
            _follow(config, address, coordinator, clients, started + timeout, tqdm)
            try:
                code = coordinator.proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise DemoError(f"the coordinator did not exit\n{coordinator.tail()}") from None
            if code != 0:
                raise DemoError(f"the coordinator exited with {code}\n{coordinator.tail()}")
            for client in clients:
                try:
                    client.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    raise DemoError(f"{client.name} did not exit\n{client.tail()}") from None
                if client.failed():
                    raise DemoError(f"{client.name} exited with {client.proc.returncode}\n{client.tail()}")
        except DemoError as failure:
            print(f"paramsel demo failed: {failure}", file=sys.stderr, flush=True)
            return 1
    figures = json.loads((out / FIGURES_FILE).read_text(encoding="utf-8"))
    print(format_table(figures))
    print(summary(figures))
    print(f"figures: {out / FIGURES_FILE}")
    print(f"plot: {out / PLOT_FILE}")
    print(f"wall time: {time.monotonic() - started:.1f} s", flush=True)
    return 0


def _follow(
    config: DemoConfig,
    address: str,
    coordinator: _Child,
    clients: list[_Child],
    deadline: float,
    tqdm: type,
) -> None:
    """Shows the progress bar until every round of every run is complete; raises when a process fails."""
    total = config.rounds * len(config.runs)
    done = 0
    with CoordinatorStub(address) as stub, tqdm(total=total, unit="round", desc="federated rounds") as bar:
        while done < total:
            for child in [*clients, coordinator]:
                if child.failed():
                    raise DemoError(f"{child.name} exited with {child.proc.returncode}\n{child.tail()}")
            if coordinator.proc.poll() == 0:  # it exits 0 only once every round is complete
                bar.update(total - done)
                return
            if time.monotonic() > deadline:
                raise DemoError(f"not finished in time ({done} of {total} rounds complete)")
            try:
                info = stub.progress(done, wait=1.0)
            except grpc.RpcError:
                time.sleep(0.2)
                continue
            if info.done > done:
                bar.update(info.done - done)
                done = info.done
                bar.set_postfix_str(f"{info.run} round {info.round}: accuracy {info.accuracy:.3f}")
