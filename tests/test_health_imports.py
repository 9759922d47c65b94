"""``paramsel health`` and ``paramsel --help`` start without torch; the lazy package exports still work.

The container's HEALTHCHECK runs the probe every few seconds, and importing torch costs more than a
second of CPU each time. Each check runs in a fresh interpreter, where ``sys.modules`` shows what the
code path really imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import serve_process

import paramsel.server
import paramsel.server.app
import paramsel.server.cli
import paramsel.server.config
import paramsel.wire
import paramsel.wire.codec
import paramsel.wire.sections


def _run(code: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    """Runs ``code`` in a fresh interpreter; it ends by printing one JSON object, returned parsed."""
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, check=False
    )
    assert result.returncode == 0, result
    return result, json.loads(result.stdout.splitlines()[-1])


_LOADED = (
    "json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'app': 'paramsel.server.app' in sys.modules})"
)


@pytest.mark.slow  # a `paramsel serve` process
def test_health_probe_against_a_real_server_imports_no_torch() -> None:
    with serve_process() as (_proc, target):
        result, found = _run(
            "import json, sys\n"
            "from paramsel.server.cli import main\n"
            f"rc = main(['health', '--target', {target!r}])\n"
            f"print({_LOADED})\n"
        )
    assert result.stdout.splitlines()[0] == "SERVING"
    assert found == {"rc": 0, "torch": False, "app": False}


def test_help_imports_no_torch() -> None:
    for argv in (["--help"], ["health", "--help"], ["serve", "--help"]):
        result, found = _run(
            "import json, sys\n"
            "from paramsel.server.cli import main\n"
            "try:\n"
            f"    main({argv!r})\n"
            "except SystemExit as exit:\n"
            "    rc = exit.code\n"
            f"print({_LOADED})\n"
        )
        assert found == {"rc": 0, "torch": False, "app": False}, argv
        assert "usage: paramsel" in result.stdout


def test_light_exports_import_no_torch() -> None:
    _result, found = _run(
        "import json, sys\n"
        "from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES\n"
        "from paramsel.wire import WireError, WireLimitError\n"
        "from paramsel.server import ServerConfig\n"
        "assert ServerConfig().chunk_size_bytes == DEFAULT_CHUNK_SIZE_BYTES\n"
        "rc = 0\n"
        f"print({_LOADED})\n"
    )
    assert found == {"rc": 0, "torch": False, "app": False}


def test_lazy_exports_are_the_defining_modules_objects() -> None:
    from paramsel.server import ServerConfig, cli, create_server
    from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES, DenseDecl, WireError, chunk_frames

    assert create_server is paramsel.server.app.create_server
    assert ServerConfig is paramsel.server.config.ServerConfig
    assert cli.main is paramsel.server.cli.main  # a submodule, not an export, still imports
    assert DenseDecl is paramsel.wire.codec.DenseDecl
    assert chunk_frames is paramsel.wire.sections.chunk_frames
    assert issubclass(WireError, ValueError)
    assert DEFAULT_CHUNK_SIZE_BYTES is paramsel.wire.codec.DEFAULT_CHUNK_SIZE_BYTES
    assert paramsel.wire.MAX_CHUNK_SIZE_BYTES is paramsel.wire.codec.MAX_CHUNK_SIZE_BYTES
    for package in (paramsel.wire, paramsel.server):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        assert set(package.__all__) <= set(dir(package))


def test_unknown_names_still_fail() -> None:
    for package in (paramsel.wire, paramsel.server):
        with pytest.raises(AttributeError, match="no_such_name"):
            getattr(package, "no_such_name")  # noqa: B009
