"""The FL4Health-style example client runs with only its imports changed, remote and embedded."""

from __future__ import annotations

import difflib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from support import serve_process

from paramsel.client import ParamselError, StatusCode, _target

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fl4health_client"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_import_lines_differ() -> None:
    original = (EXAMPLE / "client_fl4health.py").read_text().splitlines()
    switched = (EXAMPLE / "client.py").read_text().splitlines()
    changed = [
        line[1:]
        for line in difflib.unified_diff(original, switched, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed, "the two files should differ in their imports"
    for line in changed:
        assert line == "" or line.startswith(("import ", "from ")), f"a non-import line differs: {line!r}"
    assert any("fl4health" in line for line in changed)
    assert any("paramsel.client" in line for line in changed)


@pytest.mark.slow
def test_example_against_separately_started_server(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_process() as (proc, target):
        monkeypatch.setenv("PARAMSEL_TARGET", target)
        embedded_before = _target._embedded
        losses = _load(EXAMPLE / "client.py").run(clients=2, rounds=2)
        assert _target._embedded is embedded_before, (
            "the example must use PARAMSEL_TARGET, not an embedded server"
        )
        assert losses[-1] < 0.5 * losses[0]
        # Proof that the calls really went to that process: once it stops, the same client fails.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ParamselError) as err:
            _load(EXAMPLE / "client.py").run(clients=1, rounds=1)
        assert err.value.status is StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_example_as_a_script_with_the_embedded_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "client.py"), "--rounds", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    losses = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("round")]
    assert len(losses) == 3
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_serve_process_answers_health_and_reflection() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with serve_process() as (_, target), grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert "paramsel.v1.ParameterSelectionService" in names
        assert "grpc.health.v1.Health" in names
