"""docker-compose.yml's services, run as local processes: the entrypoints, commands, environment, bind
mount, dependency order, health check and roles it declares, with every service name mapped to a
loopback port. (No Docker engine runs on these machines' test jobs; this is the same federated run
`docker compose up` starts, and `make compose-demo` runs the real one.)"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from ruamel.yaml import YAML
from support import free_port

pytestmark = pytest.mark.slow  # the docker-compose services as processes, a whole federated run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKDIR = "/home/paramsel"  # the images' WORKDIR: relative paths in a command are relative to it
ROLE_LABEL = "paramsel.ci.role"
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _compose_check() -> ModuleType:
    """scripts/compose_check.py: the figures check `make compose-demo` runs on the bind mount."""
    spec = importlib.util.spec_from_file_location("compose_check", ROOT / "scripts" / "compose_check.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["compose_check"] = module
    spec.loader.exec_module(module)
    return module


def _interpolate(value: Any) -> str:
    """Compose's ${NAME:-default}, from this process's environment."""
    return _DEFAULTED.sub(lambda m: os.environ.get(m.group(1), m.group(2)), str(value))


def _executable(name: str) -> list[str]:
    """A program of the images, from this environment: `paramsel` (both images' ENTRYPOINT), `python`, or
    another console script of the venv (a service's `entrypoint:`: paramsel-demo, Flower's programs)."""
    if name == "paramsel":
        return [sys.executable, "-m", "paramsel.server.cli"]
    if name == "python":
        return [sys.executable]
    found = shutil.which(name, path=str(BIN))
    assert found, f"{name} is not installed in {BIN} (make setup)"
    return [found]


def _plan(services: dict[str, Any], tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per service: its local command line and environment, `service:port` mapped to loopback ports.
    Each service gets a FLWR_HOME of its own, as each container has its own home."""
    ports = {}
    for name, service in services.items():
        command = [_interpolate(arg) for arg in service.get("command") or []]
        if "--port" in command:
            ports[name] = (command[command.index("--port") + 1], str(free_port()))

    def local(value: str) -> str:
        for other, (inside, outside) in ports.items():
            value = value.replace(f"{other}:{inside}", f"127.0.0.1:{outside}")
        return value

    plan = {}
    for name, service in services.items():
        command = [_interpolate(arg) for arg in service.get("command") or []]
        if name in ports:
            command[command.index("--port") + 1] = ports[name][1]
        command = [local("127.0.0.1" if arg == "0.0.0.0" else arg) for arg in command]
        command = [
            str(tmp_path / arg.removeprefix(f"{WORKDIR}/")) if arg.startswith(f"{WORKDIR}/") else arg
            for arg in command
        ]
        entrypoint = service.get("entrypoint") or ["paramsel"]
        environment = {
            key: local(_interpolate(value)) for key, value in (service.get("environment") or {}).items()
        }
        environment["FLWR_HOME"] = str(tmp_path / "homes" / name / ".flwr")
        plan[name] = ([*_executable(entrypoint[0]), *entrypoint[1:], *command], environment)
    return plan


def _healthy(service: dict[str, Any], command: list[str]) -> bool:
    """Runs the service's healthcheck test against the port it was given here."""
    test = [str(arg) for arg in service["healthcheck"]["test"]]
    assert test[0] == "CMD"
    inside = _interpolate(service["command"][service["command"].index("--port") + 1])
    local_port = command[command.index("--port") + 1]
    args = [arg.replace(f":{inside}", f":{local_port}") for arg in test[2:]]
    return subprocess.run([*_executable(test[1]), *args], capture_output=True, timeout=60).returncode == 0


def _start_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        ready = [
            name
            for name, service in services.items()
            if name not in order and all(dep in order for dep in service.get("depends_on", {}))
        ]
        assert ready, f"a dependency cycle among {set(services) - set(order)}"
        order.extend(ready)
    return order


def _mounts(service: dict[str, Any], tmp_path: Path) -> list[Path]:
    """The service's bind mounts, each as the folder under tmp_path (the working directory) that its
    target inside WORKDIR becomes."""
    folders = []
    for volume in service.get("volumes") or []:
        assert volume["type"] == "bind", volume
        assert volume["target"].startswith(f"{WORKDIR}/"), volume
        folder = tmp_path / volume["target"].removeprefix(f"{WORKDIR}/")
        folder.mkdir(parents=True, exist_ok=True)  # the host folder must exist (create_host_path: false)
        folders.append(folder)
    return folders


@pytest.mark.timeout(900)  # ~1 min on 2 idle cores; the bounds below only catch a hang
def test_compose_services_as_local_processes(tmp_path: Path) -> None:
    services = YAML(typ="safe").load((ROOT / "docker-compose.yml").read_text())["services"]
    plan = _plan(services, tmp_path)
    roles = {
        name: (service.get("labels") or {}).get(ROLE_LABEL, "service") for name, service in services.items()
    }
    jobs = [name for name, role in roles.items() if role == "job"]
    assert jobs, "nothing tells when the run is over"
    outputs = {name: _mounts(service, tmp_path) for name, service in services.items()}
    processes: dict[str, subprocess.Popen[str]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in services}
    env_base = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    # The images' PATH starts with their venv's bin: SuperExecs start flwr-serverapp, flwr-clientapp by name.
    env_base["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"

    def log(name: str) -> str:
        return logs[name].read_text(errors="replace")[-4000:]

    try:
        for name in _start_order(services):
            for dependency, condition in services[name].get("depends_on", {}).items():
                if condition["condition"] == "service_healthy":
                    deadline = time.monotonic() + 180
                    while not _healthy(services[dependency], plan[dependency][0]):
                        assert time.monotonic() < deadline, f"{dependency} never became healthy"
                        assert processes[dependency].poll() is None, f"{dependency} exited\n{log(dependency)}"
                        time.sleep(0.5)
            command, environment = plan[name]
            with logs[name].open("w") as stream:
                processes[name] = subprocess.Popen(
                    command,
                    cwd=tmp_path,
                    env={**env_base, **environment},
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
        # As scripts/compose_check.py wait: every job exits 0, every service stays up meanwhile.
        deadline = time.monotonic() + 720
        while any(processes[job].poll() is None for job in jobs):
            for name, role in roles.items():
                if role == "job" and processes[name].poll() not in (None, 0):
                    pytest.fail(f"job {name} exited {processes[name].returncode}\n{log(name)}")
                if role == "service":
                    assert processes[name].poll() is None, (
                        f"service {name} exited while the jobs ran\n{log(name)}"
                    )
            assert time.monotonic() < deadline, f"the jobs {jobs} did not finish"
            time.sleep(1)
        for job in jobs:
            assert processes[job].returncode == 0, f"job {job} exited {processes[job].returncode}\n{log(job)}"
        # The services exit 0 on their stop signal, as `docker compose stop` stops them (dependants first).
        for name in reversed(_start_order(services)):
            if roles[name] == "service":
                stop = getattr(signal, services[name].get("stop_signal", "SIGTERM"))
                processes[name].send_signal(stop)
                assert processes[name].wait(timeout=60) == 0, f"{name} on {stop.name}\n{log(name)}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: whatever it started too
                process.wait()
    # The outputs land in the bind-mounted folder and pass the check `make compose-demo` makes of them;
    # the job used the service the compose file points it at (it started no server of its own).
    check = _compose_check()
    folders = [folder for job in jobs for folder in outputs[job]]
    assert folders, "no job writes to a bind-mounted folder"
    for job in jobs:
        command, environment = plan[job]
        rounds = int(command[command.index("--rounds") + 1]) if "--rounds" in command else None
        for folder in outputs[job]:
            figures = json.loads((folder / "figures.json").read_text())
            for run in figures["runs"].values():
                assert rounds is None or len(run["rounds"]) == rounds, job
        text = logs[job].read_text(errors="replace")
        if environment.get("PARAMSEL_TARGET"):
            assert f"using the paramsel service at {environment['PARAMSEL_TARGET']}" in text, text[-2000:]
        assert "final held-out accuracy" in text, text[-2000:]
    for folder in folders:
        print(check.check_outputs(folder, min_accuracy=0.5))
    shutil.rmtree(tmp_path, ignore_errors=True)
