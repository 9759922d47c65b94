"""``paramsel demo``: real short runs as processes, the coordinator protocol's refusals, the non-IID split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from paramsel.client import aggregate_sparse_coo, pack_compact, unpack_compact
from paramsel.demo.coordinator import Coordinator, CoordinatorServer, service_aggregator
from paramsel.demo.data import label_skew_split, load_shard
from paramsel.demo.protocol import (
    COMPACT_PAYLOAD,
    DENSE_RUN,
    PACKED_LIST,
    SERVICE,
    SPARSE_RUN,
    SUBMIT,
    CoordinatorStub,
    DemoConfig,
    Message,
    compact_arrays,
    compact_payload,
    decode,
    encode,
)
from paramsel.server.app import RunningServer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHORT_RUN = ["--clients", "2", "--rounds", "2", "--seed", "7"]


def _demo(out: Path, *, target: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    if target is not None:
        env["PARAMSEL_TARGET"] = target
    return subprocess.run(
        [sys.executable, "-m", "paramsel.server.cli", "demo", *SHORT_RUN, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """2 clients, 2 rounds; ``paramsel demo`` starts its own ``paramsel serve``."""
    out = tmp_path_factory.mktemp("demo")
    return _demo(out, target=None), out


def _figures(out: Path) -> dict[str, Any]:
    figures: dict[str, Any] = json.loads((out / "figures.json").read_text(encoding="utf-8"))
    return figures


@pytest.mark.slow  # `paramsel demo` runs: processes that train
def test_short_run_writes_every_round_table_and_plot(
    short_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = short_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "paramsel serve is up at 127.0.0.1:" in proc.stdout
    assert "round | accuracy" in proc.stdout
    assert "dense FedAvg: final held-out accuracy" in proc.stdout
    figures = _figures(out)
    assert figures["config"]["clients"] == 2
    assert figures["config"]["rounds"] == 2
    assert set(figures["runs"]) == {SPARSE_RUN, DENSE_RUN}
    for run in figures["runs"].values():
        assert 0.0 <= run["initial"]["accuracy"] <= 1.0
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        for r in run["rounds"]:
            assert 0.0 <= r["accuracy"] <= 1.0
            assert len(r["accuracy_per_client"]) == 2
            assert all(0.0 <= a <= 1.0 for a in r["accuracy_per_client"])
            assert all(b > 0 for b in r["bytes_sent_per_client"] + r["bytes_received_per_client"])
    assert figures["runs"][SPARSE_RUN]["payload"] == COMPACT_PAYLOAD
    assert figures["runs"][DENSE_RUN]["payload"] == PACKED_LIST
    sparse, dense = figures["runs"][SPARSE_RUN]["rounds"], figures["runs"][DENSE_RUN]["rounds"]
    for s, d in zip(sparse, dense, strict=True):
        # the compact payloads, both ways, are well under the dense model (and the aggregate's union)
        assert max(s["bytes_sent_per_client"]) < 0.6 * min(d["bytes_sent_per_client"])
        assert max(s["bytes_received_per_client"]) < 0.6 * min(d["bytes_received_per_client"])
        # the same selections as FL4Health's packed lists: 20 B per value instead of about 4.7 B
        assert s["fl4health_list_bytes_sent"] > 2 * s["bytes_sent"]
        assert s["fl4health_list_bytes_received"] > 2 * s["bytes_received"]
        # a dense run exchanges FL4Health's packed list itself
        assert d["fl4health_list_bytes_sent"] == d["bytes_sent"]
        assert d["fl4health_list_bytes_received"] == d["bytes_received"]
    assert sparse[-1]["cumulative_bytes"] < dense[-1]["cumulative_bytes"]
    # dense: the whole float32 model (2410 parameters) plus the names array, both ways, every round
    assert all(b >= 2410 * 4 for b in dense[0]["bytes_sent_per_client"])
    assert "sparse as FL4Health's packed lists" in proc.stdout
    plot = (out / "accuracy_vs_bytes.png").read_bytes()
    assert plot.startswith(PNG_SIGNATURE)


@pytest.mark.slow  # `paramsel demo` runs: processes that train
def test_same_seed_same_figures_through_a_running_service(
    short_run: tuple[subprocess.CompletedProcess[str], Path], server: RunningServer, tmp_path: Path
) -> None:
    """The second run uses ``$PARAMSEL_TARGET`` (the test session's server) instead of its own."""
    first_proc, first_out = short_run
    assert first_proc.returncode == 0, first_proc.stdout + first_proc.stderr
    proc = _demo(tmp_path, target=server.target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"using the paramsel service at {server.target}" in proc.stdout
    assert "paramsel serve is up" not in proc.stdout
    assert _figures(tmp_path) == _figures(first_out)


@pytest.fixture
def coordinator(server: RunningServer) -> Iterator[CoordinatorStub]:
    config = DemoConfig(clients=2, rounds=2)
    # Every aggregate is made before the submit that completes its round returns, so a fetch of it never
    # waits: the round timeout only bounds the fetch of a round nobody submitted, which must time out.
    running = CoordinatorServer(Coordinator(config, service_aggregator(server.target), round_timeout=1.0))
    running.start()
    try:
        with CoordinatorStub(running.target) as stub:
            yield stub
    finally:
        running.stop(0)


def _layer(values: list[float]) -> list[np.ndarray]:
    return [np.array(values, dtype=np.float32), np.array(["w"])]


def _refused(call: Any, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details()


def test_coordinator_refuses_wrong_round_and_duplicate_client(coordinator: CoordinatorStub) -> None:
    stub = coordinator
    assert stub.config().clients == 2
    _refused(
        lambda: stub.submit(DENSE_RUN, 2, 0, 10, _layer([1.0, 2.0])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "round 2",
        "has not started",
        "at round 1",
    )
    stub.submit(DENSE_RUN, 1, 0, 1, _layer([1.0, 2.0]))
    _refused(
        lambda: stub.submit(DENSE_RUN, 1, 0, 1, _layer([1.0, 2.0])),
        grpc.StatusCode.ALREADY_EXISTS,
        "client 0 already submitted round 1",
    )
    _refused(
        lambda: stub.submit(DENSE_RUN, 1, 2, 1, _layer([1.0, 2.0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "client index 2",
    )
    _refused(
        lambda: stub.submit("bogus", 1, 1, 1, _layer([1.0, 2.0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown run",
    )
    _refused(
        lambda: stub.report(
            DENSE_RUN,
            1,
            0,
            accuracy=0.5,
            loss=1.0,
            train_loss=1.0,
            bytes_sent=1,
            bytes_received=1,
            fl4health_list_bytes_sent=1,
            fl4health_list_bytes_received=1,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "not been aggregated",
    )
    stub.submit(DENSE_RUN, 1, 1, 3, _layer([3.0, 4.0]))  # the last one in: aggregated through the service
    values, names = stub.fetch(DENSE_RUN, 1, timeout=60)
    np.testing.assert_array_equal(values, np.array([2.5, 3.5], dtype=np.float32))  # weighted by 1 and 3
    assert names.tolist() == ["w"]
    _refused(
        lambda: stub.submit(DENSE_RUN, 1, 1, 3, _layer([3.0, 4.0])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "round 1",
        "already aggregated",
    )
    _refused(
        lambda: stub.fetch(DENSE_RUN, 2, timeout=60), grpc.StatusCode.DEADLINE_EXCEEDED, "0 of 2 clients"
    )


def _selection(values: list[float], flat: list[int]) -> list[np.ndarray]:
    """A sparse COO packed list of one 3 x 4 tensor 'w'."""
    coords = np.stack(np.unravel_index(np.array(flat, dtype=np.int64), (3, 4)), axis=1)
    return [
        np.array(values, dtype=np.float32),
        coords.astype(np.int64),
        np.array([3, 4], dtype=np.int64),
        np.array(["w"]),
    ]


def test_top_k_runs_exchange_compact_payloads(coordinator: CoordinatorStub, server: RunningServer) -> None:
    """Submissions are compact payloads, expanded for the aggregation; the aggregate goes back compactly."""
    stub = coordinator
    first, second = _selection([1.0, 2.0], [0, 5]), _selection([4.0, 8.0, 16.0], [5, 6, 11])
    _refused(
        lambda: stub.submit(SPARSE_RUN, 1, 0, 1, first),  # a packed list, not a compact payload
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed compact payload",
        "one 1-d uint8 array",
    )
    _refused(
        lambda: stub.submit(SPARSE_RUN, 1, 0, 1, compact_arrays(b"\xff\xff\xff")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed compact payload",
        "not a paramsel compact payload",
    )
    stub.submit(SPARSE_RUN, 1, 0, 1, compact_arrays(pack_compact(first)))
    stub.submit(SPARSE_RUN, 1, 1, 3, compact_arrays(pack_compact(second)))
    got = stub.fetch(SPARSE_RUN, 1, timeout=60)
    want = aggregate_sparse_coo([(first, 1), (second, 3)], target=server.target)
    assert len(got) == 1
    assert got[0].dtype == np.uint8
    assert compact_payload(got) == pack_compact(want)
    for mine, theirs in zip(unpack_compact(compact_payload(got)), want, strict=True):
        assert mine.dtype == theirs.dtype
        np.testing.assert_array_equal(mine, theirs)


def test_coordinator_refuses_malformed_messages(coordinator: CoordinatorStub) -> None:
    with grpc.insecure_channel(coordinator.target) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/{SUBMIT}", request_serializer=None, response_deserializer=None)
        _refused(lambda: raw(b"not numpy", timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "malformed message")
        missing = encode(Message.of({"run": DENSE_RUN, "round": 1}, _layer([1.0])))
        _refused(lambda: raw(missing, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "no field 'client'")


def test_message_round_trip_needs_no_pickle() -> None:
    arrays: list[np.ndarray] = [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([[0, 1], [1, 2]], dtype=np.int64),
        np.zeros((0, 2), dtype=np.int64),
        np.array(["fc1.weight", "fc2.bias"]),
    ]
    message = decode(encode(Message.of({"run": "sparse", "round": 3, "accuracy": 0.5}, arrays)))
    assert message.get_str("run") == "sparse"
    assert message.get_int("round") == 3
    assert message.get_float("accuracy") == 0.5
    for got, want in zip(message.arrays, arrays, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="pickle"):
        encode(Message.of({}, [np.array([{"a": 1}], dtype=object)]))


def test_label_skew_split_by_hand() -> None:
    labels = np.repeat([0, 1, 2], 10)
    shards = label_skew_split(labels, clients=3, skew=0.6, seed=0)
    counts = [np.bincount(labels[s], minlength=3).tolist() for s in shards]
    # class c: 6 to client c % 3, the other 4 split 2 + 2 between the other clients
    assert counts == [[6, 2, 2], [2, 6, 2], [2, 2, 6]]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(30))

    labels = np.repeat([0, 1, 2, 3, 4], [10, 10, 10, 10, 7])
    shards = label_skew_split(labels, clients=2, skew=0.8, seed=1)
    counts = [np.bincount(labels[s], minlength=5).tolist() for s in shards]
    # homes: 0, 2, 4 on client 0; 1, 3 on client 1; 7 * 0.8 = 5.6 -> 6 at home, 1 away
    assert counts == [[8, 2, 8, 2, 6], [2, 8, 2, 8, 1]]

    labels = np.repeat([0, 1], [7, 3])
    shards = label_skew_split(labels, clients=3, skew=0.5, seed=2)
    counts = [np.bincount(labels[s], minlength=2).tolist() for s in shards]
    # 7 * 0.5 = 3.5 -> 4 at home (half up), 3 away: 2 to client 1, 1 to client 2 (earlier clients first);
    # 3 * 0.5 = 1.5 -> 2 at home (client 1), 1 away: to client 0, none to client 2
    assert counts == [[4, 1], [2, 2], [1, 0]]
    assert label_skew_split(labels, clients=3, skew=0.5, seed=2)[0].tolist() == shards[0].tolist()


def test_digit_shards_are_skewed() -> None:
    shards = [load_shard(i, 3, skew=0.8, seed=0) for i in range(3)]
    for index, shard in enumerate(shards):
        counts = np.bincount(shard.y_train, minlength=10)
        home = [d for d in range(10) if d % 3 == index]
        assert counts[home].sum() / counts.sum() > 0.75
        assert counts.min() > 0  # every digit is seen somewhere on every client, just rarely
        assert len(shard.y_test) == 360
    assert sum(len(s.y_train) for s in shards) == 1797 - 360
