"""The demo's Flower App (demo/): real short runs of ``paramsel-demo`` as processes (paramsel serve, a
Flower SuperLink on the Simulation Engine, the ServerApp and ClientApps), the ServerApp's strategy on
hand-made replies, the payload records, the non-IID split, and the app's files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from paramsel.client import aggregate_sparse_coo, pack_compact, unpack_compact
from paramsel.server.app import RunningServer
from paramsel_demo.server_app import DemoRunError, ParamselFedAvg, Recorder
from paramsel_demo.settings import (
    COMPACT_PAYLOAD,
    DENSE_RUN,
    SPARSE_RUN,
    STATE_DICT,
    DemoSettings,
)
from paramsel_demo.task import label_skew_split, load_shard
from paramsel_demo.wire import (
    METRICS,
    PAYLOAD,
    arrays_record,
    compact_arrays,
    compact_payload,
    record_arrays,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHORT_RUN = ["--clients", "2", "--rounds", "2", "--seed", "7"]
MODEL_PARAMETERS = 64 * 32 + 32 + 32 * 10 + 10


def _demo(out: Path, *args: str, target: str | None = None) -> subprocess.CompletedProcess[str]:
    """``paramsel-demo`` in a process of its own, as ``make demo`` runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    if target is not None:
        env["PARAMSEL_TARGET"] = target
    return subprocess.run(
        [sys.executable, "-m", "paramsel_demo", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,
        check=False,
    )


@pytest.mark.slow  # paramsel serve, a SuperLink, Ray and the apps: real processes that train
@pytest.mark.timeout(900)
def test_a_short_run_prints_the_table_and_writes_the_figures_and_plot(tmp_path: Path) -> None:
    proc = _demo(tmp_path, *SHORT_RUN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"paramsel serve is up at 127\.0\.0\.1:\d+", proc.stdout)
    assert "Flower SuperLink (Simulation Engine) at 127.0.0.1:" in proc.stdout
    assert "round | accuracy    loss    sent B    recv B" in proc.stdout
    assert re.search(r"^\s+2 \|\s+[01]\.\d{4}", proc.stdout, re.MULTILINE), proc.stdout
    assert "sparse as FL4Health's packed lists" in proc.stdout
    assert "dense FedAvg: final held-out accuracy" in proc.stdout
    assert "federated rounds" in proc.stderr  # the progress bar
    figures: dict[str, Any] = json.loads((tmp_path / "figures.json").read_text(encoding="utf-8"))
    assert figures["config"] == dataclasses.asdict(DemoSettings(clients=2, rounds=2, seed=7))
    assert set(figures["runs"]) == {SPARSE_RUN, DENSE_RUN}
    for run in figures["runs"].values():
        assert 0.0 <= run["initial"]["accuracy"] <= 1.0
        assert run["initial"]["loss"] > 0
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        for r in run["rounds"]:
            assert 0.0 <= r["accuracy"] <= 1.0
            assert len(r["accuracy_per_client"]) == 2
            assert all(0.0 <= a <= 1.0 for a in r["accuracy_per_client"])
            assert all(b > 0 for b in r["bytes_sent_per_client"] + r["bytes_received_per_client"])
            assert r["loss"] > 0
            assert r["train_loss"] > 0
    # Every client starts from the same seeded model and evaluates on the same held-out split.
    assert figures["runs"][SPARSE_RUN]["initial"] == figures["runs"][DENSE_RUN]["initial"]
    assert figures["runs"][SPARSE_RUN]["payload"] == COMPACT_PAYLOAD
    assert figures["runs"][DENSE_RUN]["payload"] == STATE_DICT
    sparse, dense = figures["runs"][SPARSE_RUN]["rounds"], figures["runs"][DENSE_RUN]["rounds"]
    for s, d in zip(sparse, dense, strict=True):
        # the compact payloads, both ways, are well under the dense model (and the aggregate's union)
        assert max(s["bytes_sent_per_client"]) < 0.6 * min(d["bytes_sent_per_client"])
        assert max(s["bytes_received_per_client"]) < 0.6 * min(d["bytes_received_per_client"])
        # the same selections as FL4Health's packed lists: 20 B per value instead of about 4.7 B
        assert s["fl4health_list_bytes_sent"] > 2 * s["bytes_sent"]
        assert s["fl4health_list_bytes_received"] > 2 * s["bytes_received"]
        # dense: the whole float32 model both ways, every round
        assert d["bytes_sent_per_client"] == [MODEL_PARAMETERS * 4] * 2
        assert d["bytes_received_per_client"] == [MODEL_PARAMETERS * 4] * 2
    assert sparse[-1]["cumulative_bytes"] < dense[-1]["cumulative_bytes"]
    assert (tmp_path / "accuracy_vs_bytes.png").read_bytes().startswith(PNG_SIGNATURE)
    progress = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [p["event"] for p in progress] == ["start", "round", "round", "round", "round", "done"]
    for log in ("paramsel-serve.log", "superlink.log", "flwr-run.log"):
        assert (tmp_path / "logs" / log).is_file(), log


@pytest.mark.slow  # a SuperLink, Ray and the apps: real processes
@pytest.mark.timeout(900)
def test_a_failing_server_app_makes_the_command_fail(tmp_path: Path) -> None:
    """Nothing listens at the paramsel target: every client's push fails, the ServerApp raises, the run
    ends finished:failed (though `flwr run --stream` exits 0), and so the command exits 1."""
    proc = _demo(tmp_path, "--rounds", "1", "--no-dense-baseline", target="127.0.0.1:1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "using the paramsel service at 127.0.0.1:1" in proc.stdout
    assert "the Flower run ended finished:failed" in proc.stderr
    assert "training of round 1 of run 'sparse'" in proc.stderr
    assert "UNAVAILABLE" in proc.stderr
    assert not (tmp_path / "figures.json").exists()
    assert "final held-out accuracy" not in proc.stdout


def test_bad_options_exit_2_before_anything_starts(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--sparsity", "1.5")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sparsity must be in (0, 1], got 1.5" in proc.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_a_running_superlink_needs_a_paramsel_service_every_node_reaches(tmp_path: Path) -> None:
    """--superlink (the Deployment Engine, docker-compose.yml's job): the launcher starts neither serve
    nor a SuperLink, so the service must be named; a server of its own on loopback would not do."""
    proc = _demo(tmp_path, "--superlink", "superlink:8000")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--superlink needs $PARAMSEL_TARGET" in proc.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started


# -- the ServerApp's strategy on hand-made replies --------------------------------------------------


def _message(content: RecordDict | None = None, error: Error | None = None, node: int = 1) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return make_message(metadata, content=content, error=error)


def _selection(values: list[float], flat: list[int]) -> list[np.ndarray]:
    """A sparse COO packed list of one 3 x 4 tensor 'w'."""
    coords = np.stack(np.unravel_index(np.array(flat, dtype=np.int64), (3, 4)), axis=1)
    return [
        np.array(values, dtype=np.float32),
        coords.astype(np.int64),
        np.array([3, 4], dtype=np.int64),
        np.array(["w"]),
    ]


def _train_reply(client: int, examples: int, packed: list[np.ndarray]) -> Message:
    metrics = MetricRecord(
        {
            "client": client,
            "num-examples": examples,
            "train-loss": 1.0,
            "bytes-sent": 1,
            "fl4health-list-bytes-sent": 1,
            "initial-accuracy": 0.1,
            "initial-loss": 2.0,
        }
    )
    payload = arrays_record(compact_arrays(pack_compact(packed)))
    return _message(RecordDict({PAYLOAD: payload, METRICS: metrics}), node=client + 10)


def _strategy(server: RunningServer) -> ParamselFedAvg:
    settings = DemoSettings(clients=2, rounds=1, dense_baseline=False)
    return ParamselFedAvg(settings, SPARSE_RUN, Recorder(settings, None), server.target)


def test_the_strategy_aggregates_compact_payloads_through_the_service(server: RunningServer) -> None:
    first, second = _selection([1.0, 2.0], [0, 5]), _selection([4.0, 8.0, 16.0], [5, 6, 11])
    replies = [_train_reply(1, 3, second), _train_reply(0, 1, first)]  # in any order
    arrays, metrics = _strategy(server).aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    assert metrics["train-loss"] == 1.0
    got = record_arrays(arrays)
    want = aggregate_sparse_coo([(first, 1), (second, 3)], target=server.target)
    assert compact_payload(got) == pack_compact(want)
    for mine, theirs in zip(unpack_compact(compact_payload(got)), want, strict=True):
        assert mine.dtype == theirs.dtype
        np.testing.assert_array_equal(mine, theirs)


def test_the_strategy_raises_on_a_client_error_or_a_missing_reply(server: RunningServer) -> None:
    strategy = _strategy(server)
    reason = (
        "Traceback ...\nray::ClientAppActor.run()\nException ClientAppException occurred. Message: boom'>"
    )
    failed = _message(error=Error(code=0, reason=reason), node=7)
    with pytest.raises(
        DemoRunError, match=r"training of round 1 of run 'sparse': 1 of 2 clients failed: boom \(nodes 7\)"
    ):
        strategy.aggregate_train(1, [_train_reply(0, 1, _selection([1.0], [0])), failed])
    with pytest.raises(DemoRunError, match=r"replies from clients \[0\] of 2"):
        strategy.aggregate_train(1, [_train_reply(0, 1, _selection([1.0], [0]))])
    with pytest.raises(DemoRunError, match="two replies from client 0"):
        strategy.aggregate_train(1, [_train_reply(0, 1, _selection([1.0], [0]))] * 2)


# -- payloads, settings and the app's files ---------------------------------------------------------


def test_payload_records_keep_order_dtypes_and_names() -> None:
    arrays: list[np.ndarray] = [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([[0, 1], [1, 2]], dtype=np.int64),
        np.zeros((0, 2), dtype=np.int64),
        *[np.zeros(1, dtype=np.float16)] * 9,  # keys 0 ... 12: sorted by number, not as text
        np.array(["fc1.weight", "fc2.bias"]),
    ]
    for got, want in zip(record_arrays(arrays_record(arrays)), arrays, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="one 1-d uint8 array"):
        compact_payload(arrays)
    assert compact_payload(compact_arrays(b"\x01\x02")) == b"\x01\x02"


def _toml(path: Path) -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    parsed: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    return parsed


def _app_config() -> dict[str, Any]:
    return _toml(DEMO / "pyproject.toml")


def test_the_app_config_holds_the_defaults_and_every_key_the_launcher_sets() -> None:
    config = _app_config()
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "paramsel_demo.server_app:app",
        "clientapp": "paramsel_demo.client_app:app",
    }
    run_config = app["config"]
    assert DemoSettings.from_run_config(run_config) == DemoSettings()
    # `flwr run --run-config` may only override keys the app declares
    launched = {*DemoSettings().run_config(), "paramsel-target", "out-dir"}
    assert launched <= set(run_config)


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group(0).lower()


def test_the_demo_extra_lists_the_apps_dependencies_beyond_the_sdk() -> None:
    """demo/pyproject.toml holds the app's dependencies; the `demo` extra of the server's distribution
    (server/pyproject.toml) repeats those that paramsel and paramsel-client do not bring, with the same
    ranges, so that requirements/dev.lock pins them."""
    server = _toml(ROOT / "server" / "pyproject.toml")["project"]
    client = _toml(ROOT / "client_sdk" / "pyproject.toml")["project"]
    brought = {_name(r) for r in server["dependencies"] + client["dependencies"]}
    extra = set(server["optional-dependencies"]["demo"])
    app = set(_app_config()["project"]["dependencies"])
    assert {_name(r) for r in app} >= {"paramsel", "flwr"}
    assert {r for r in app if _name(r) not in brought | {"paramsel"}} == extra


def test_no_hand_written_grpc_method_paths_in_the_demo() -> None:
    """The demo talks Flower's Message API and paramsel's SDK; no home-made rpc."""
    for path in sorted(DEMO.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"[\"'`]/[\w.]+\.v\d+\.\w+/\w+", text), path
        assert "unary_unary" not in text
        assert "generic_rpc_handlers" not in text


# -- the data ---------------------------------------------------------------------------------------


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
