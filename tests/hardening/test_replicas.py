"""Client-side round robin across three replicas: calls spread over them and survive losing one."""

from __future__ import annotations

import json
import signal
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from support import Output, serve_process, wait_for
from torch import nn

from paramsel.client import Connection, SparseCooParameterExchanger, largest_magnitude_change_scores

pytestmark = pytest.mark.slow  # three `paramsel serve` processes


def _calls(output: Output) -> int:
    lines = [
        json.loads(line[line.index("{") :])
        for line in list(output)
        if '"event":"call"' in line.replace(" ", "")
    ]
    return sum(1 for line in lines if line["code"] == "OK")


def _settled_calls(outputs: list[Output], total: int) -> list[int]:
    """Calls per replica once ``total`` have been logged: a replica writes its call line after the reply
    has left, so the last line can reach its log a moment after the client has its answer."""
    wait_for(lambda: sum(_calls(out) for out in outputs) >= total, what=f"{total} call lines")
    return [_calls(out) for out in outputs]


def test_round_robin_spreads_calls_and_survives_a_lost_replica() -> None:
    torch.manual_seed(0)
    current, initial = nn.Linear(16, 8), nn.Linear(16, 8)
    reference = SparseCooParameterExchanger(0.25, largest_magnitude_change_scores).push_parameters(
        current, initial
    )
    outputs = [Output() for _ in range(3)]
    with ExitStack() as stack:
        replicas = [stack.enter_context(serve_process(output=out)) for out in outputs]
        ports = [target.rsplit(":", 1)[1] for _, target in replicas]
        connection = Connection(
            target="ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports),
            load_balancing_policy="round_robin",
        )
        exchanger = SparseCooParameterExchanger(
            0.25, largest_magnitude_change_scores, connection=connection, reuse_initial_model=False
        )
        for _ in range(9):
            packed = exchanger.push_parameters(current, initial)
            assert all(np.array_equal(a, b) for a, b in zip(packed, reference, strict=True))
        spread = _settled_calls(outputs, 9)
        assert sum(spread) == 9
        assert all(count >= 1 for count in spread), f"calls per replica: {spread}"
        # Lose one replica abruptly: every later push still returns the right answer.
        lost, _ = replicas[0]
        lost.send_signal(signal.SIGKILL)
        lost.wait(timeout=10)
        for _ in range(6):
            packed = exchanger.push_parameters(current, initial)
            assert all(np.array_equal(a, b) for a, b in zip(packed, reference, strict=True))
        survivors = _settled_calls(outputs[1:], sum(spread[1:]) + 6)
        assert sum(survivors) - sum(spread[1:]) == 6
