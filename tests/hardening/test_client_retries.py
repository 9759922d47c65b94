"""Deadlines and retries of SDK calls against the real server, failures injected in front of its chain."""

from __future__ import annotations

import threading
from typing import TypedDict

import pytest
import torch
from support import Knobs, injecting_server

from paramsel.client import (
    Client,
    Connection,
    DynamicLayerExchanger,
    ParamselError,
    ScoreFunction,
    StatusCode,
    TopK,
)
from paramsel.client import LayerSelectionFunctionConstructor as Layers
from paramsel.client._connection import Connection as ConnectionClass
from paramsel.client._retry import backoff


class Backoff(TypedDict):
    """Connection's backoff settings, passed as ``**FAST``."""

    initial_backoff_seconds: float
    max_backoff_seconds: float


FAST: Backoff = {"initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.05}
PUSH = "/paramsel.v1.ParameterSelectionService/Push"


def criterion(sparsity_level: float) -> TopK:
    return TopK(sparsity_level, ScoreFunction.LARGEST_FINAL_MAGNITUDE)


MODEL = {"w": torch.arange(1000, dtype=torch.float32) - 300}  # |w| has no ties


def reference() -> list[float]:
    return [float(v) for v in range(600, 700)]


def pushed(client: Client, **kwargs: object) -> list[float]:
    result = client.push(criterion(0.1), MODEL, **kwargs)  # type: ignore[arg-type]
    return sorted(abs(v) for v in result.arrays[0][1].tolist())


def test_unavailable_is_retried_with_the_whole_upload() -> None:
    knobs = Knobs(unavailable_first=2)
    with injecting_server(knobs) as target:
        assert pushed(Client(connection=Connection(target, max_attempts=3, **FAST))) == reference()
    assert knobs.calls == [PUSH] * 3


def test_the_budget_ends_in_a_clear_error() -> None:
    knobs = Knobs(unavailable_first=100)
    with injecting_server(knobs) as target, pytest.raises(ParamselError) as failed:
        pushed(Client(connection=Connection(target, max_attempts=4, **FAST)))
    assert failed.value.status == StatusCode.UNAVAILABLE
    assert "gave up after 4 attempt(s)" in failed.value.message
    assert len(knobs.calls) == 4


def test_invalid_argument_is_not_retried() -> None:
    knobs = Knobs()
    with injecting_server(knobs) as target, pytest.raises(ParamselError) as failed:
        Client(connection=Connection(target, **FAST)).push(criterion(2.0), MODEL)
    assert failed.value.status == StatusCode.INVALID_ARGUMENT
    assert knobs.calls == [PUSH]


def test_initial_model_refusal_then_upload_survives_retries() -> None:
    """A restarted server lacks the initial model: the retry names it, is refused, and uploads it."""
    initial = {"w": torch.zeros(1000)}
    knobs = Knobs(unavailable_first=1)
    with injecting_server(knobs) as target:
        client = Client(connection=Connection(target, **FAST))
        result = client.push(criterion(0.1), MODEL, initial)
        assert sorted(abs(v) for v in result.arrays[0][1].tolist()) == reference()
    # 1: UNAVAILABLE (digest only); 2: refused, model not held; 3: uploaded with the initial model.
    assert knobs.calls == [PUSH] * 3


def test_deadline_exceeded_is_reported_and_not_retried() -> None:
    # The server holds the call until the client has given up (or a minute has passed): the client
    # must give up at its own deadline, while the server still holds it, whatever the machine's load.
    hold = threading.Event()
    knobs = Knobs(hold=hold)
    with injecting_server(knobs) as target:
        try:
            with pytest.raises(ParamselError) as failed:
                pushed(Client(connection=Connection(target, timeout_seconds=0.5, **FAST)))
            assert knobs.held_to_the_end == 0, "the client waited for the server instead of its deadline"
        finally:
            hold.set()
    assert failed.value.status == StatusCode.DEADLINE_EXCEEDED
    assert knobs.calls == [PUSH]


@pytest.mark.slow  # waits out deadlines
def test_the_deadline_covers_the_retries() -> None:
    # 100 attempts are allowed, each refused, with waits of 0.1 to 0.2 s between them: only the 2 s
    # deadline can stop them before the 100th. Counted in calls, not seconds: a slower machine makes
    # fewer, never more.
    knobs = Knobs(unavailable_first=100)
    slow = Connection(
        "", timeout_seconds=2.0, max_attempts=100, initial_backoff_seconds=0.2, max_backoff_seconds=0.2
    )
    with injecting_server(knobs) as target, pytest.raises(ParamselError) as failed:
        pushed(Client(target=target, connection=slow))
    assert failed.value.status == StatusCode.DEADLINE_EXCEEDED, failed.value
    assert 1 <= len(knobs.calls) <= 21  # each wait is at least 0.1 s of the 2 s


def test_connection_reaches_the_drop_in_classes() -> None:
    knobs = Knobs(unavailable_first=1)
    with injecting_server(knobs, tokens=("t",)) as target:
        connection = Connection(target, token="t", **FAST)
        exchanger = DynamicLayerExchanger(Layers(0.1, 0.5, connection=connection).select_by_percentage())
        model, initial = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
        packed = exchanger.push_parameters(model, initial)
    assert len(packed) == 2  # one of the two layers, and the names
    assert knobs.authorizations[0] == "Bearer t"
    assert set(knobs.authorizations) == {"Bearer t"}


def test_backoff_is_capped_and_jittered() -> None:
    c = ConnectionClass(initial_backoff_seconds=0.2, max_backoff_seconds=1.0)
    for retry, cap in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)):
        waits = [backoff(c, retry) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits)
        assert len(set(waits)) > 1
