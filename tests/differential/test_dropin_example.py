"""The FL4Health example client, run twice: as written for FL4Health (the real one) and with only its
imports swapped for paramsel's. Every packed list each client pushes, every aggregate it pulls and every
loss must be the same, bit for bit, through the embedded server and a separately started one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
from helpers import assert_packed_identical

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fl4health_client"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"differential_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module: ModuleType, clients: int, rounds: int) -> tuple[list[list[list[np.ndarray]]], list[float]]:
    """The example's own ``run``, step by step, keeping what each client pushes every round."""
    fleet = [module.SparseClient(seed) for seed in range(clients)]
    pushes: list[list[list[np.ndarray]]] = []
    losses = [sum(c.loss() for c in fleet) / clients]
    global_parameters = None
    for _ in range(rounds):
        results = [client.fit(global_parameters) for client in fleet]
        pushes.append([packed for packed, _ in results])
        global_parameters = module.fedavg_sparse(results)
        losses.append(sum(c.loss() for c in fleet) / clients)
    return pushes, losses


def test_the_example_matches_fl4health_round_by_round(paramsel_target: str) -> None:
    original = _load(EXAMPLE / "client_fl4health.py")
    switched = _load(EXAMPLE / "client.py")
    assert original.SparseCooParameterExchanger.__module__.startswith("fl4health.")
    assert switched.SparseCooParameterExchanger.__module__.startswith("paramsel.")
    expected_pushes, expected_losses = _run(original, clients=2, rounds=3)
    pushes, losses = _run(switched, clients=2, rounds=3)
    assert len(pushes) == len(expected_pushes) == 3
    for round_pushes, round_expected in zip(pushes, expected_pushes, strict=True):
        for packed, expected in zip(round_pushes, round_expected, strict=True):
            assert_packed_identical(packed, expected)
    assert losses == expected_losses
    assert expected_losses[-1] < 0.5 * expected_losses[0]  # it trained: the comparison is not of no-ops
