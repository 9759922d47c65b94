"""``paramsel-demo --compare``: the figures' arithmetic on hand-made records (hand-computed numbers), the
Flower wire count of a payload record byte by byte, the options, and (slow) a short real comparison."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message

from paramsel.client import aggregate_updates, unpack_compact
from paramsel.server.app import RunningServer
from paramsel_demo.client_app import evaluate_round, hidden_units, learning_rate, train_round
from paramsel_demo.compare import (
    COMPARE_FILE,
    COMPARE_PLOT,
    COMPARE_TABLE,
    DENSE,
    METHODS,
    CompareSettings,
    build_compare_figures,
    final_accuracy,
    format_compare_table,
    mean_rounds,
    method_summary,
    round_seed,
    rounds_to,
    run_figures,
    upload_fraction,
    write_compare,
)
from paramsel_demo.settings import DemoSettings
from paramsel_demo.task import initial_model
from paramsel_demo.wire import (
    METRICS,
    PAYLOAD,
    arrays_record,
    compact_arrays,
    compact_payload,
    flower_wire_bytes,
    record_arrays,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- the figures' arithmetic ------------------------------------------------------------------------


def test_final_accuracy_is_the_mean_of_the_last_three_rounds() -> None:
    assert final_accuracy([0.25, 0.5, 0.625, 0.75, 1.0]) == pytest.approx((0.625 + 0.75 + 1.0) / 3)
    assert final_accuracy([0.5, 0.75, 0.5, 1.0]) == pytest.approx(0.75)  # (0.75 + 0.5 + 1.0) / 3
    assert final_accuracy([0.25, 0.75]) == 0.5  # fewer rounds than three: all of them
    assert final_accuracy([0.5]) == 0.5
    with pytest.raises(ValueError, match="no rounds"):
        final_accuracy([])


def test_rounds_to_90_percent_is_the_first_round_reaching_it() -> None:
    assert rounds_to([0.5, 0.89, 0.9, 0.95]) == 3
    assert rounds_to([0.91, 0.5]) == 1  # the first, even if it drops again
    assert rounds_to([0.5, 0.899, 0.8]) is None  # never
    # 324 of 360 right on each of three clients: a mean of exactly 0.9 that rounds to 0.9000000000000001
    # or 0.8999999999999999 depending on the order of the sum still counts
    assert rounds_to([0.8999999999999999]) == 1
    # the mean over the seeds that reach it, and how many do
    assert mean_rounds([2, 5, 3])[0] == pytest.approx(10 / 3)
    assert mean_rounds([2, 5, 3])[1] == 3
    assert mean_rounds([2, None, 4]) == (3.0, 2)
    assert mean_rounds([None, None]) == (None, 0)


def test_upload_fraction_against_dense() -> None:
    assert upload_fraction(9_830, 78_640) == 0.125
    assert upload_fraction(1_966, 78_640) == 0.025  # exactly 1/40
    with pytest.raises(ValueError, match="dense bytes must be > 0"):
        upload_fraction(1, 0)


def _client(accuracy: float, sent: float, received: float) -> dict[str, float]:
    return {
        "accuracy": accuracy,
        "loss": 1.0 - accuracy,
        "train_loss": 0.5,
        "sent": sent,
        "received": received,
        "payload_sent": sent - 400,
        "payload_received": received - 400,
    }


def test_one_run_averages_over_clients_and_rounds() -> None:
    """Two clients, four rounds, hand-made."""
    rounds = [
        {0: _client(0.50, 1_000, 2_000), 1: _client(0.70, 1_200, 2_000)},
        {0: _client(0.80, 1_100, 2_200), 1: _client(0.90, 900, 2_200)},
        {1: _client(1.00, 1_000, 1_800), 0: _client(0.80, 1_000, 1_800)},  # any client order
        {0: _client(0.90, 800, 2_000), 1: _client(0.94, 1_000, 2_000)},
    ]
    run = run_figures(rounds, initial_accuracy=0.1)
    # per round, the mean over the clients: accuracies 0.6, 0.85, 0.9, 0.92; sent 1100, 1000, 1000, 900
    assert [r["accuracy"] for r in run["rounds"]] == pytest.approx([0.6, 0.85, 0.9, 0.92])
    assert [r["sent"] for r in run["rounds"]] == [1_100, 1_000, 1_000, 900]
    assert [r["cumulative_sent"] for r in run["rounds"]] == [1_100, 2_100, 3_100, 4_000]
    assert run["rounds"][2]["accuracy_per_client"] == [0.80, 1.00]  # client order
    assert run["final_accuracy"] == pytest.approx((0.85 + 0.9 + 0.92) / 3)
    assert run["rounds_to_target"] == 3
    assert run["sent_per_round"] == 1_000  # 4000 / 4
    assert run["received_per_round"] == 2_000  # (2000 + 2200 + 1800 + 2000) / 4
    assert run["sent_total"] == 4_000
    assert run["received_total"] == 8_000
    assert run["initial_accuracy"] == 0.1


def _flat_run(accuracies: list[float], sent: float, received: float) -> list[dict[int, dict[str, float]]]:
    """Two clients that agree every round."""
    return [{c: _client(a, sent, received) for c in (0, 1)} for a in accuracies]


def test_a_method_over_three_seeds() -> None:
    runs = {
        0: run_figures(_flat_run([0.80, 0.90, 0.90, 0.96], 1_000, 3_000), 0.1),  # final 0.92, 90 % at 2
        1: run_figures(_flat_run([0.70, 0.80, 0.85, 0.92], 1_100, 3_000), 0.1),  # final 0.8566.., at 4
        2: run_figures(_flat_run([0.60, 0.70, 0.80, 0.88], 1_200, 3_300), 0.1),  # final 0.7933.., never
    }
    summary = method_summary(runs)
    assert summary["final_accuracy"] == pytest.approx((0.92 + (0.8 + 0.85 + 0.92) / 3 + 2.38 / 3) / 3)
    assert summary["final_accuracy_min"] == pytest.approx(2.38 / 3)
    assert summary["final_accuracy_max"] == pytest.approx(0.92)
    assert summary["rounds_to_target"] == 3.0  # (2 + 4) / 2: the seeds that reach it
    assert summary["seeds_reaching_target"] == 2
    assert summary["sent_per_round"] == 1_100
    assert summary["received_per_round"] == 3_100
    assert summary["sent_total"] == 4_400
    # the curve: per round, the mean over the seeds of the cumulative upload and of the accuracy
    assert [p["cumulative_sent"] for p in summary["curve"]] == [1_100, 2_200, 3_300, 4_400]
    assert [p["accuracy"] for p in summary["curve"]] == pytest.approx([0.7, 0.8, 0.85, 0.92])


def _settings(seeds: int = 2) -> CompareSettings:
    return CompareSettings(DemoSettings(clients=2, rounds=4, seed=5), seeds=seeds, hidden_units=256)


def _records(
    by_method: dict[str, tuple[list[float], float]],
) -> tuple[dict[str, dict[int, Any]], dict[str, dict[int, float]]]:
    """Every method: these accuracies and bytes sent (received twice as many) for both seeds 5 and 6."""
    rounds: dict[str, dict[int, Any]] = {}
    initial: dict[str, dict[int, float]] = {}
    for method in METHODS:
        accuracies, sent = by_method.get(method.key, ([0.5, 0.5, 0.5, 0.5], 10_000))
        rounds[method.key] = {seed: _flat_run(accuracies, sent, 2 * sent) for seed in (5, 6)}
        initial[method.key] = {5: 0.1, 6: 0.1}
    return rounds, initial


def test_the_figures_ratios_and_targets(tmp_path: Path) -> None:
    rounds, initial = _records(
        {
            DENSE: ([0.90, 0.95, 0.96, 0.97], 80_000),  # final 0.96
            "ef-top-k-0.1-f32": ([0.80, 0.95, 0.95, 0.956], 16_000),  # 0.8 points below, 1/5: missed
            "ef-top-k-0.1-f16": ([0.80, 0.95, 0.955, 0.956], 12_800),  # 0.633 points below, 0.16: met
            "ef-random-k-0.1-f32": ([0.40, 0.60, 0.70, 0.80], 10_000),  # 26 points below: missed
            "ef-top-k-0.01-f32": ([0.80, 0.93, 0.95, 0.95], 2_000),  # 1.67 below, exactly 1/40: met
            "ef-top-k-0.01-f16": ([0.80, 0.93, 0.93, 0.93], 1_600),  # 3 points below: missed
        }
    )
    settings = _settings()
    figures = build_compare_figures(settings, rounds, initial)
    assert figures["config"]["seeds"] == [5, 6]
    assert figures["config"]["parameters"] == 64 * 256 + 256 + 256 * 10 + 10 == 19_210
    methods = figures["methods"]
    assert list(methods) == [m.key for m in METHODS]
    assert methods[DENSE]["summary"]["final_accuracy"] == pytest.approx(0.96)
    assert methods[DENSE]["summary"]["upload_fraction"] == 1.0
    assert methods["ef-top-k-0.1-f32"]["summary"]["upload_fraction"] == 0.2
    assert methods["values-0.1"]["summary"]["upload_fraction"] == 0.125  # the default 10,000 B
    assert methods["values-0.1"]["summary"]["rounds_to_target"] is None
    checks = {c["method"]: c for c in figures["targets"]}
    assert list(checks) == [  # the 0.1 ones, then the 0.01 ones
        "ef-top-k-0.1-f32",
        "ef-top-k-0.1-f16",
        "ef-random-k-0.1-f32",
        "ef-top-k-0.01-f32",
        "ef-top-k-0.01-f16",
    ]
    # dense: (0.95 + 0.96 + 0.97) / 3 = 0.96; 0.96 - (0.95 + 0.95 + 0.956) / 3 = 0.008: 0.8 points,
    # within 1; but 16000 / 80000 = 1/5 > 1/6
    assert checks["ef-top-k-0.1-f32"]["accuracy_points_below_dense"] == pytest.approx(0.8)
    assert checks["ef-top-k-0.1-f32"]["met"] is False
    assert checks["ef-top-k-0.1-f16"]["accuracy_points_below_dense"] == pytest.approx(1.9 / 3)
    assert checks["ef-top-k-0.1-f16"]["upload_fraction"] == 0.16
    assert checks["ef-top-k-0.1-f16"]["met"] is True
    assert checks["ef-random-k-0.1-f32"]["met"] is False
    assert checks["ef-top-k-0.01-f32"]["accuracy_points_below_dense"] == pytest.approx(5 / 3)
    assert checks["ef-top-k-0.01-f32"]["upload_fraction"] == 0.025
    assert checks["ef-top-k-0.01-f32"]["met"] is True
    assert checks["ef-top-k-0.01-f16"]["accuracy_points_below_dense"] == pytest.approx(3.0)
    assert checks["ef-top-k-0.01-f16"]["met"] is False

    table = format_compare_table(figures)
    assert (
        "| dense FedAvg | 0.9600 (0.9600\N{EN DASH}0.9600) | 1.0 | 80,000 | 160,000 | 320,000 | 640,000 | 1 |"
        in table
    )
    assert "| EF updates, top-k 0.1, float32 | 0.9520 (0.9520\N{EN DASH}0.9520) | 2.0 | 16,000 |" in table
    assert "0.2000 (1/5.0) |" in table
    assert "| FL4Health sparse values, top-k 0.1 | 0.5000 (0.5000\N{EN DASH}0.5000) | never |" in table
    assert "- EF updates, top-k 0.01, float32: 1.67 points below dense (at most 2)" in table
    assert table.count(": met") == 2
    assert table.count(": MISSED") == 3
    assert "Flower 1.41's Deployment Engine" in table  # the caption says what the bytes are

    paths = write_compare(figures, tmp_path)
    assert [p.name for p in paths] == [COMPARE_FILE, COMPARE_TABLE, COMPARE_PLOT]
    assert json.loads(paths[0].read_text(encoding="utf-8")) == json.loads(json.dumps(figures))
    assert paths[1].read_text(encoding="utf-8") == table + "\n"
    assert paths[2].read_bytes().startswith(PNG_SIGNATURE)


def test_some_seeds_never_reach_90_percent() -> None:
    rounds, initial = _records({DENSE: ([0.9, 0.95, 0.96, 0.97], 80_000)})
    rounds["values-0.01"][6] = _flat_run([0.5, 0.6, 0.7, 0.8], 1_000, 2_000)
    rounds["values-0.01"][5] = _flat_run([0.5, 0.6, 0.92, 0.93], 1_000, 2_000)
    figures = build_compare_figures(_settings(), rounds, initial)
    summary = figures["methods"]["values-0.01"]["summary"]
    assert (summary["rounds_to_target"], summary["seeds_reaching_target"]) == (3.0, 1)
    assert "| 3.0 (1 of 2 seeds; the others never) |" in format_compare_table(figures)


# -- the runs' settings -----------------------------------------------------------------------------


def test_the_comparison_runs_every_method_for_every_seed() -> None:
    settings = CompareSettings(DemoSettings(seed=7), seeds=3)
    assert settings.seed_list == [7, 8, 9]
    assert len(settings.runs) == 24
    assert [m.key for m, s in settings.runs[:4]] == ["dense"] * 3 + ["values-0.1"]
    assert {m.kind for m in METHODS} == {"dense", "values", "updates"}
    assert len(METHODS) == 8
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        CompareSettings(DemoSettings(), seeds=0)
    config = settings.run_config()
    assert config["compare"] is True
    assert CompareSettings.from_run_config(config) == settings
    # the app's default hidden-units (0): 256 for the comparison, the demo's 32 otherwise
    assert CompareSettings.from_run_config({**config, "hidden-units": 0}).hidden_units == 256
    assert hidden_units({**config, "hidden-units": 0}) == 256
    assert hidden_units({**DemoSettings().run_config(), "compare": False, "hidden-units": 0}) == 32
    assert hidden_units({"hidden-units": 64}) == 64
    # the app's default learning-rate (0): the task's 0.05, for the demo and the comparison alike
    assert learning_rate({**config, "learning-rate": 0.0}) == 0.05
    assert learning_rate({"learning-rate": 0.1}) == 0.1
    assert CompareSettings.from_run_config({**config, "learning-rate": 0.02}).learning_rate == 0.02


def test_a_random_k_round_seed_is_shared_and_changes_every_round() -> None:
    seeds = {(s, r): round_seed(s, r) for s in (0, 1) for r in range(1, 11)}
    assert len(set(seeds.values())) == 20
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert round_seed(0, 3) == seeds[(0, 3)]  # every client of a round derives the same one


# -- the bytes --------------------------------------------------------------------------------------


def test_flower_wire_bytes_of_a_compact_payload_by_hand() -> None:
    """One 1-d uint8 array of 500 bytes (a compact payload) as Flower 1.41 deflates it:
    - ArrayChunk: "ArrayChunk" + " " + "" (no children) + " " + "628" + NUL, then the .npy bytes (a
      128-byte header + 500) = 10 + 1 + 1 + 3 + 1 + 628 = 644;
    - Array: "Array" + " " + its chunk's 64-hex id + " " + "83" + NUL, then the JSON
      {"dtype": "uint8", "shape": [500], "stype": "numpy.ndarray", "arraychunk_ids": [0]} (83 bytes)
      = 5 + 1 + 64 + 1 + 2 + 1 + 83 = 157;
    - ArrayRecord: "ArrayRecord" + " " + the array's id + " " + "73" + NUL, then {"0": "<64 hex>"}
      (7 + 64 + 2 = 73 bytes) = 11 + 1 + 64 + 1 + 2 + 1 + 73 = 153.
    """
    record = arrays_record([np.zeros(500, dtype=np.uint8)])
    assert flower_wire_bytes(record) == 644 + 157 + 153 == 954
    # two identical arrays: the same chunk (one object id) goes once, the same Array too
    twice = arrays_record([np.zeros(500, dtype=np.uint8)] * 2)
    # the record's header names its one distinct child; its JSON {"0": "<id>", "1": "<id>"} is
    # 7 + 64 + 3 + 6 + 64 + 2 = 146 bytes
    assert flower_wire_bytes(twice) == 644 + 157 + (11 + 1 + 64 + 1 + 3 + 1 + 146)


# -- the ClientApp of an update run, message by message, against a real server -----------------------


def _message(kind: str, run: str, round_number: int, node: int, payload: bytes | None = None) -> Message:
    key = run.split("@")[0]
    config = ConfigRecord({"run": run, "method": key, "run-seed": 0, "server-round": round_number})
    content = RecordDict({"config": config})
    if payload is not None:
        content[PAYLOAD] = arrays_record(compact_arrays(payload))
    metadata = Metadata(
        run_id=1,
        message_id=f"{kind}-{round_number}-{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id=str(round_number),
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return make_message(metadata, content=content)


def _context(server: RunningServer, clients: int, index: int) -> Context:
    settings = CompareSettings(DemoSettings(clients=clients, rounds=2), seeds=1, hidden_units=4)
    config = {**settings.run_config(), "paramsel-target": server.target, "out-dir": ""}
    return Context(
        run_id=1,
        node_id=index + 1,
        node_config={"partition-id": index, "num-partitions": clients},
        state=RecordDict(),
        run_config=config,
    )


def _sent(reply: Message) -> tuple[bytes, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A train reply's compact payload, and per tensor its (flat positions, values)."""
    payload = compact_payload(record_arrays(reply.content.array_records[PAYLOAD]))
    packed = unpack_compact(payload)
    n = len(packed[-1])
    sent = {}
    for name, values, coords, shape in zip(
        packed[-1], packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], strict=True
    ):
        flat = (
            np.ravel_multi_index(tuple(np.asarray(coords).T), tuple(shape))
            if len(coords)
            else np.zeros(0, int)
        )
        sent[str(name)] = (np.asarray(flat), np.asarray(values))
    return payload, sent


def _state(context: Context, key: str) -> dict[str, torch.Tensor]:
    return dict(context.state.array_records[key].to_torch_state_dict())


@pytest.mark.slow  # runs the demo's ClientApp against a server
def test_an_update_client_keeps_the_global_model_and_its_residual_between_messages(
    server: RunningServer,
) -> None:
    """One client, MLP 64-4-10 (310 parameters), top-k 0.1 (31 entries), float32 values."""
    run = "ef-top-k-0.1-f32@0"
    context = _context(server, 1, 0)
    w0 = initial_model(0, 4).state_dict()
    payload, sent = _sent(train_round(_message("train", run, 1, 1), context))
    assert sum(len(v) for _, v in sent.values()) == 31
    # the node keeps the round's initial model (the global one), not the trained one
    for name, tensor in _state(context, f"{run}-model").items():
        assert torch.equal(tensor, w0[name]), name
    # the residual: zero where sent (float32 values lose nothing), the update elsewhere; top-k by |u|:
    # every sent |u| is at least every unsent one
    residual = _state(context, f"{run}-residual")
    assert set(residual) == set(w0)
    smallest_sent = min(float(np.abs(v).min()) for _, v in sent.values())
    largest_kept = 0.0
    for name, (positions, _) in sent.items():
        flat = residual[name].reshape(-1)
        assert torch.all(flat[torch.from_numpy(positions)] == 0), name
        unsent = np.setdiff1d(np.arange(flat.numel()), positions)
        largest_kept = max(largest_kept, float(flat[torch.from_numpy(unsent)].abs().max()))
    assert largest_kept > 0
    assert smallest_sent >= largest_kept

    # the round's aggregate (one client: its own update, averaged over itself) is added to w0
    aggregate = aggregate_updates([(payload, 600)], target=server.target)
    reply = evaluate_round(_message("evaluate", run, 1, 1, aggregate), context)
    metrics = reply.content.metric_records[METRICS]
    accuracy, wire = metrics["accuracy"], metrics["wire-bytes-received"]
    assert isinstance(accuracy, float)
    assert 0.0 <= accuracy <= 1.0
    assert isinstance(wire, int)
    assert wire > len(aggregate)  # Flower's framing on top of the compact payload
    model = _state(context, f"{run}-model")
    for name, tensor in model.items():
        want = w0[name].clone().reshape(-1)
        positions, values = sent.get(name, (np.zeros(0, int), np.zeros(0, np.float32)))
        want[torch.from_numpy(positions)] += torch.from_numpy(values)
        assert torch.equal(tensor.reshape(-1), want), name

    # round 2 pushes u = (w - w0) + the residual the node kept: a residual of 100 at fc2.bias[3], put
    # there by hand, is sent (|u| about 100 tops every other entry) and leaves the residual
    planted = {name: torch.zeros_like(t) for name, t in model.items()}
    planted["fc2.bias"][3] = 100.0
    context.state[f"{run}-residual"] = ArrayRecord(planted)
    _, sent = _sent(train_round(_message("train", run, 2, 1), context))
    positions, values = sent["fc2.bias"]
    assert 3 in positions.tolist()
    assert 99.0 < float(values[positions.tolist().index(3)]) < 101.0
    assert float(_state(context, f"{run}-residual")["fc2.bias"][3]) == 0.0


def test_random_k_clients_of_a_round_send_the_same_positions_and_they_change_every_round(
    server: RunningServer,
) -> None:
    run = "ef-random-k-0.1-f32@0"
    contexts = [_context(server, 2, index) for index in (0, 1)]
    rounds = []
    for round_number in (1, 2):
        sent = [
            _sent(train_round(_message("train", run, round_number, i + 1), c))[1]
            for i, c in enumerate(contexts)
        ]
        # per tensor, ceil(n x 0.1) positions, the same for both clients (their values differ)
        for name, (positions, values) in sent[0].items():
            assert len(positions) == math.ceil(_NUMEL_64_4_10[name] * 0.1), name
            np.testing.assert_array_equal(positions, sent[1][name][0])
            assert not np.array_equal(values, sent[1][name][1]), name
        rounds.append(sent[0])
    # a new round, a new seed, other positions
    assert any(not np.array_equal(rounds[0][n][0], rounds[1][n][0]) for n in rounds[0])


_NUMEL_64_4_10 = {"fc1.weight": 256, "fc1.bias": 4, "fc2.weight": 40, "fc2.bias": 10}


# -- the command ------------------------------------------------------------------------------------


def _demo(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    return subprocess.run(
        [sys.executable, "-m", "paramsel_demo", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--criterion", "layers_threshold"], "--criterion does not apply"),
        (["--sparsity", "0.2", "--no-dense-baseline"], "--sparsity, --no-dense-baseline does not apply"),
        (["--seeds", "0"], "seeds must be >= 1, got 0"),
        (["--hidden-units", "0"], "hidden units must be >= 1, got 0"),
        (["--superlink", "superlink:8000"], "--compare runs on the Simulation Engine only"),
    ],
)
def test_bad_compare_options_exit_2_before_anything_starts(
    tmp_path: Path, args: list[str], said: str
) -> None:
    proc = _demo(tmp_path, "--compare", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert said in proc.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # paramsel serve, a SuperLink, Ray and the apps: real processes that train
@pytest.mark.timeout(900)
def test_a_short_comparison_writes_the_table_figures_and_plot(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--compare", "--rounds", "2", "--seeds", "1", "--clients", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "comparison runs" in proc.stderr  # the progress bar
    assert "8/8" in proc.stderr
    figures: dict[str, Any] = json.loads((tmp_path / COMPARE_FILE).read_text(encoding="utf-8"))
    table = (tmp_path / COMPARE_TABLE).read_text(encoding="utf-8")
    assert table in proc.stdout
    assert (tmp_path / COMPARE_PLOT).read_bytes().startswith(PNG_SIGNATURE)
    assert figures["config"]["seeds"] == [3]
    assert figures["config"]["parameters"] == 19_210
    methods = figures["methods"]
    assert list(methods) == [m.key for m in METHODS]
    dense = methods[DENSE]["runs"]["3"]
    # dense: the whole float32 model both ways, every round: 76,840 bytes of data, four .npy headers
    # and Flower's object headers
    for r in dense["rounds"]:
        assert r["payload_sent"] == r["payload_received"] == 19_210 * 4
        assert 19_210 * 4 + 4 * 128 < r["sent"] == r["received"] < 19_210 * 4 + 4 * 128 + 2_000
    for key, entry in methods.items():
        run = entry["runs"]["3"]
        assert 0.0 <= run["initial_accuracy"] <= 1.0
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        for r in run["rounds"]:
            assert 0.0 <= r["accuracy"] <= 1.0
            assert len(r["accuracy_per_client"]) == 2
            assert r["loss"] > 0
            assert r["sent"] > r["payload_sent"] > 0  # Flower's framing on top of the payload
            assert r["received"] > r["payload_received"] > 0
        # every run starts from seed 3's model, evaluated on the same held-out split
        assert run["initial_accuracy"] == dense["initial_accuracy"]
        summary = entry["summary"]
        assert summary["final_accuracy"] == pytest.approx(
            sum(r["accuracy"] for r in run["rounds"]) / 2  # fewer than three rounds: both
        )
        if key != DENSE:
            # sparse, both ways: well under the dense model at 0.1, about a tenth of that at 0.01
            limit = 0.4 if entry["sparsity"] == 0.1 else 0.06
            assert summary["upload_fraction"] < limit, key
            assert summary["received_per_round"] < 0.6 * methods[DENSE]["summary"]["received_per_round"]
    # float16 values: fewer bytes than float32 for the same selection rule
    for sparsity in ("0.1", "0.01"):
        f16 = methods[f"ef-top-k-{sparsity}-f16"]["summary"]["sent_per_round"]
        f32 = methods[f"ef-top-k-{sparsity}-f32"]["summary"]["sent_per_round"]
        assert f16 < f32
    # the training learns something in two rounds, whatever the exchange
    assert min(e["summary"]["final_accuracy"] for e in methods.values()) > 0.2
    assert len(figures["targets"]) == 5
