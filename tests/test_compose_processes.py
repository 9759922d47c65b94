"""docker-compose.yml's topology, run as local processes: the commands, environment, dependency order
and health check it declares, with every service name mapped to a loopback port. (No Docker engine runs
on these machines; this is the same federated run `docker compose up` would start.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

pytestmark = pytest.mark.slow  # the docker-compose topology as processes, a 10-round federated run

ROOT = Path(__file__).resolve().parents[1]
PARAMSEL = [sys.executable, "-m", "paramsel.server.cli"]  # the image's ENTRYPOINT, `paramsel`
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _interpolate(value: Any) -> str:
    """Compose's ${NAME:-default}, from this process's environment."""
    return _DEFAULTED.sub(lambda m: os.environ.get(m.group(1), m.group(2)), str(value))


def _plan(services: dict[str, Any]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per service: its local command line and environment, service names and ports mapped to loopback."""
    ports = {}
    for name, service in services.items():
        command = [_interpolate(arg) for arg in service["command"]]
        if "--port" in command:
            ports[name] = (command[command.index("--port") + 1], str(_free_port()))
    plan = {}
    for name, service in services.items():
        command = [_interpolate(arg) for arg in service["command"]]
        if name in ports:
            command[command.index("--port") + 1] = ports[name][1]
        command = ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in command]
        environment = {}
        for key, value in (service.get("environment") or {}).items():
            value = _interpolate(value)
            for other, (inside, outside) in ports.items():
                value = value.replace(f"{other}:{inside}", f"127.0.0.1:{outside}")
            environment[key] = value
        plan[name] = (command, environment)
    return plan


def _healthy(service: dict[str, Any], plan: tuple[list[str], dict[str, str]], container_port: str) -> bool:
    """Runs the service's healthcheck command (its `paramsel ...` test) against the mapped port."""
    test = [str(arg) for arg in service["healthcheck"]["test"]]
    assert test[:2] == ["CMD", "paramsel"]
    local_port = plan[0][plan[0].index("--port") + 1]
    args = [arg.replace(f":{container_port}", f":{local_port}") for arg in test[2:]]
    return subprocess.run([*PARAMSEL, *args], capture_output=True, timeout=60).returncode == 0


def _start_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        for name, service in services.items():
            if name not in order and all(dep in order for dep in service.get("depends_on", {})):
                order.append(name)
    return order


@pytest.mark.timeout(900)  # ~30 s on 2 idle cores; the bounds below only catch a hang
def test_compose_topology_as_local_processes(tmp_path: Path) -> None:
    services = YAML(typ="safe").load((ROOT / "docker-compose.yml").read_text())["services"]
    plan = _plan(services)
    processes: dict[str, subprocess.Popen[str]] = {}
    env_base = {k: v for k, v in os.environ.items() if k not in ("PARAMSEL_TARGET", "PARAMSEL_COORDINATOR")}
    try:
        for name in _start_order(services):
            for dependency, condition in services[name].get("depends_on", {}).items():
                if condition["condition"] == "service_healthy":
                    deadline = time.monotonic() + 180
                    while not _healthy(services[dependency], plan[dependency], "50051"):
                        assert time.monotonic() < deadline, f"{dependency} never became healthy"
                        assert processes[dependency].poll() is None, f"{dependency} exited"
                        time.sleep(0.5)
            command, environment = plan[name]
            processes[name] = subprocess.Popen(
                [*PARAMSEL, *command],
                cwd=tmp_path,
                env={**env_base, **environment},
                stdout=(tmp_path / f"{name}.log").open("w"),
                stderr=subprocess.STDOUT,
                text=True,
            )
        # The run is over when the coordinator exits (`docker compose up --exit-code-from coordinator`).
        assert processes["coordinator"].wait(timeout=480) == 0, (tmp_path / "coordinator.log").read_text()
        for name in services:
            if name.startswith("client-"):
                assert processes[name].wait(timeout=60) == 0, (tmp_path / f"{name}.log").read_text()
        # The service drains and exits cleanly on SIGTERM, as `docker compose down` stops it.
        processes["paramsel"].send_signal(signal.SIGTERM)
        assert processes["paramsel"].wait(timeout=60) == 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    rounds = int(plan["coordinator"][0][plan["coordinator"][0].index("--rounds") + 1])
    figures = json.loads(next(tmp_path.rglob("figures.json")).read_text())
    assert rounds == 10
    log = (tmp_path / "coordinator.log").read_text()
    assert f"round {rounds}/{rounds}" in log
    assert "dense FedAvg: final held-out accuracy" in log
    for run in ("sparse", "dense"):
        assert len(figures["runs"][run]["rounds"]) == rounds, run
    shutil.rmtree(tmp_path, ignore_errors=True)
