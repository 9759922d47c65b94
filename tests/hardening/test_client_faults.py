"""Real faults between the SDK and a server on loopback: a killed and restarted ``paramsel serve``,
and connections cut by a TCP proxy. A retried call ends with the right result or a clear error."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from support import CuttingProxy, free_port, serve_process, wait_for

import paramsel.client._client as client_module
from paramsel.client import Client, Connection, ParamselError, PushResult, ScoreFunction, StatusCode, TopK
from paramsel.server.app import RunningServer
from paramsel.wire import streams

CRITERION = TopK(0.001, ScoreFunction.LARGEST_FINAL_MAGNITUDE)


def model(numel: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    half = numel // 2
    return {
        "a.weight": torch.randn(half, generator=generator),
        "b.weight": torch.randn(numel - half, generator=generator),
    }


def assert_same(got: PushResult, want: PushResult) -> None:
    assert [name for name, _ in got.arrays] == [name for name, _ in want.arrays]
    for (_, g), (_, w) in zip(got.arrays, want.arrays, strict=True):
        assert torch.equal(g, w)


@pytest.mark.slow  # two `paramsel serve` processes and a 200 MB model
def test_push_survives_a_server_killed_mid_upload_and_restarted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="paramsel.client")
    state = model(50_000_000)  # 200 MB of float32
    halfway, killed = threading.Event(), threading.Event()
    attempts: list[int] = []
    write_frames = streams.write_frames  # the function client_module imported

    def pausing(*args: Any, **kwargs: Any) -> Iterator[Any]:
        attempts.append(1)
        first = len(attempts) == 1
        for number, frame in enumerate(write_frames(*args, **kwargs)):
            yield frame
            if first and number == 30:  # ~30 chunks in: hold the upload until the server is dead
                halfway.set()
                killed.wait(60)

    monkeypatch.setattr(client_module, "write_frames", pausing)
    port = free_port()
    target = f"127.0.0.1:{port}"
    # Enough attempts (at least 0.5 s apart once backed off) to outlast a restart on a loaded machine,
    # where `paramsel serve` can take many seconds to come up: the push stops retrying once it is.
    connection = Connection(target, max_attempts=300, initial_backoff_seconds=0.2, max_backoff_seconds=1.0)
    outcome: dict[str, Any] = {}

    def push() -> None:
        try:
            outcome["result"] = Client(connection=connection).push(CRITERION, state)
        except Exception as error:  # reported by the main thread
            outcome["error"] = error

    with serve_process("--port", str(port), "--log-level", "WARNING") as (proc, _):
        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        assert halfway.wait(120), "the upload never got going"
        proc.kill()
        proc.wait(30)
        killed.set()
        # The server stays down until the client has found it gone and is retrying.
        wait_for(
            lambda: any(r.name == "paramsel.client" and "retrying" in r.getMessage() for r in caplog.records),
            what="the client to retry against the killed server",
        )
    with serve_process("--port", str(port), "--log-level", "WARNING"):
        pusher.join(240)
        assert not pusher.is_alive()
        assert "error" not in outcome, outcome.get("error")
        monkeypatch.setattr(client_module, "write_frames", write_frames)
        reference = Client(connection=Connection(target, max_attempts=1)).push(CRITERION, state)
    assert len(attempts) >= 2
    assert_same(outcome["result"], reference)
    assert len(reference.arrays[0][1]) + len(reference.arrays[1][1]) == 50_000


def test_push_survives_a_connection_cut_once(server: RunningServer) -> None:
    state = model(8_000_000)  # 32 MB: the cut at 4 MB falls mid-upload
    proxy = CuttingProxy(server.target, cut_after=4 << 20, max_cuts=1)
    try:
        connection = Connection(proxy.target, initial_backoff_seconds=0.05, max_backoff_seconds=0.2)
        got = Client(connection=connection).push(CRITERION, state)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert proxy.connections >= 2
    assert_same(got, Client(target=server.target).push(CRITERION, state))


def test_a_connection_always_cut_ends_in_a_clear_error(server: RunningServer) -> None:
    state = model(8_000_000)
    proxy = CuttingProxy(server.target, cut_after=4 << 20, max_cuts=None)
    try:
        connection = Connection(
            proxy.target, max_attempts=3, initial_backoff_seconds=0.05, max_backoff_seconds=0.2
        )
        with pytest.raises(ParamselError) as failed:
            Client(connection=connection).push(CRITERION, state)
    finally:
        proxy.close()
    assert failed.value.status == StatusCode.UNAVAILABLE
    assert "gave up after 3 attempt(s)" in failed.value.message
    assert proxy.cuts == 3
