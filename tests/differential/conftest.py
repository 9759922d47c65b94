"""Differential tests: the real FL4Health 0.4.2 is the oracle, and its outputs are the expected values.

FL4Health is imported from wherever this interpreter finds it: installed in the compatibility
environments (``scripts/compat.sh``), or from the ``.oracle/`` folder that ``make test`` puts on
``PYTHONPATH`` for the main environment. With ``PARAMSEL_REQUIRE_ORACLE=1`` (set by ``make test`` and
the compatibility job) a missing FL4Health fails the run; otherwise these tests are skipped, so that a
bare ``pytest`` still runs the rest.

``paramsel_target`` runs each test twice: through the SDK's default (no target: the service run in this
process, on the caller's tensors), and against a separately started ``paramsel serve`` named by
``$PARAMSEL_TARGET``, the way an FL4Health client whose imports were swapped would be pointed at a remote
service. With ``PARAMSEL_DIFFERENTIAL_EMBEDDED_GRPC=1`` each test runs a third time, through the loopback
server the SDK embeds for ``PARAMSEL_TARGET=embedded-grpc``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest
from support import serve_process

from paramsel.client import ENV_TARGET
from paramsel.client._target import EMBEDDED_GRPC

if importlib.util.find_spec("fl4health") is None:
    if os.environ.get("PARAMSEL_REQUIRE_ORACLE") == "1":
        raise ImportError(
            "the FL4Health oracle is not importable: run the tests with `make test`, which builds .oracle/"
        )
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def remote_target() -> Iterator[str]:
    """A ``paramsel serve`` process of its own, on a port it picked."""
    with serve_process() as (_proc, address):
        yield address


TARGETS = ["embedded", "remote"] + (
    ["embedded-grpc"] if os.environ.get("PARAMSEL_DIFFERENTIAL_EMBEDDED_GRPC") == "1" else []
)
"""``embedded``: the SDK's default, in process; ``remote``: a ``paramsel serve``; ``embedded-grpc``: the
loopback server embedded in this process (on request)."""


@pytest.fixture(params=TARGETS)
def paramsel_target(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which server the drop-in classes reach: none (the default, in process), a remote one through the
    env, or the embedded loopback server through the env."""
    if request.param == "remote":
        monkeypatch.setenv(ENV_TARGET, request.getfixturevalue("remote_target"))
    elif request.param == "embedded-grpc":
        monkeypatch.setenv(ENV_TARGET, EMBEDDED_GRPC)
    else:
        monkeypatch.delenv(ENV_TARGET, raising=False)
    return str(request.param)
