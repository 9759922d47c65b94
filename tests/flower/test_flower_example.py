"""paramsel's SDK and Flower in one environment, and the Flower example run end to end through paramsel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paramsel.server.app import RunningServer

pytestmark = pytest.mark.slow  # Flower itself, and a Flower run in a process of its own

flwr = pytest.importorskip(
    "flwr", reason="Flower is the optional `flower` extra: pip install 'paramsel[flower]'"
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower" / "paramsel_flower.py"


def test_sdk_and_flower_share_one_protobuf_runtime() -> None:
    import google.protobuf
    from flwr.proto import fleet_pb2  # Flower's own generated messages

    from paramsel.client import SparseCooParameterExchanger, aggregate_sparse_coo
    from paramsel.v1 import service_pb2, service_pb2_grpc

    assert google.protobuf.__version__.startswith("6."), google.protobuf.__version__
    assert tuple(int(p) for p in flwr.__version__.split(".")[:2]) >= (1, 41)
    assert service_pb2.DESCRIPTOR.package == "paramsel.v1"
    assert hasattr(service_pb2_grpc, "ParameterSelectionServiceStub")
    assert fleet_pb2.DESCRIPTOR.package.startswith("flwr.")
    assert callable(aggregate_sparse_coo)
    assert SparseCooParameterExchanger is not None


def _aggregate_calls(server: RunningServer) -> float:
    return (
        server.registry.get_sample_value("paramsel_calls_total", {"method": "Aggregate", "code": "OK"}) or 0.0
    )


# Generous bounds: the run takes ~8 s alone, but the 2 cores may be shared with other jobs.
@pytest.mark.timeout(420)
def test_flower_run_aggregates_through_paramsel(server: RunningServer, tmp_path: Path) -> None:
    rounds = 3
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    before = _aggregate_calls(server)
    log = tmp_path / "example.log"
    # A process of its own: Flower's start_server installs signal handlers and process-wide state. Its
    # output goes to a file, which nothing has to drain while it runs.
    with log.open("w") as sink:
        proc = subprocess.run(
            [
                sys.executable,
                str(EXAMPLE),
                "--target",
                server.target,
                "--rounds",
                str(rounds),
                "--json",
                str(out),
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=360,
            check=False,
        )
    assert proc.returncode == 0, log.read_text()[-6000:]
    result = json.loads(out.read_text())
    assert result["rounds"] == rounds
    assert result["service_calls"] == rounds
    # The aggregations reached this test's paramsel server (its metrics live in this process).
    assert _aggregate_calls(server) - before == rounds
    losses, accuracies = result["losses"], result["accuracies"]
    assert len(losses) == len(accuracies) == rounds
    assert losses[-1] < losses[0] < result["initial_loss"]
    assert accuracies[-1] > result["initial_accuracy"] + 0.3
