"""Differential tests: the real FL4Health 0.4.2 is the oracle, and its outputs are the expected values.

FL4Health is imported from wherever this interpreter finds it: installed in the compatibility
environments (``scripts/compat.sh``), or from the ``.oracle/`` folder that ``make test`` puts on
``PYTHONPATH`` for the main environment. With ``PARAMSEL_REQUIRE_ORACLE=1`` (set by ``make test`` and
the compatibility job) a missing FL4Health fails the run; otherwise these tests are skipped, so that a
bare ``pytest`` still runs the rest.

``paramsel_target`` runs each test twice: through the SDK's embedded default, and against a separately
started ``paramsel serve`` named by ``$PARAMSEL_TARGET``, the way an FL4Health client whose imports were
swapped would be pointed at a remote service.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest
from support import serve_process

from paramsel.client import ENV_TARGET

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


@pytest.fixture(params=["embedded", "remote"])
def paramsel_target(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which server the drop-in classes reach: unset (embedded), or a remote one through the env."""
    if request.param == "remote":
        monkeypatch.setenv(ENV_TARGET, request.getfixturevalue("remote_target"))
    else:
        monkeypatch.delenv(ENV_TARGET, raising=False)
    return str(request.param)
