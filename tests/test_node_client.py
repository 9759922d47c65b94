"""The contract works from another language: examples/node/client.js against a real ``paramsel serve``.

The JavaScript client loads proto/ itself, streams a model in chunks, decodes Elias-Fano and bitmap
positions and dense tensors, computes the expected selections on its own and exits non-zero on any
mismatch (docs/clients.md is what it was written from).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import Output, serve_process

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "examples" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.slow,  # npm ci, `paramsel serve` and node
    pytest.mark.skipif(NODE is None, reason="node is not on PATH (the JavaScript client needs Node >= 18)"),
]


def _install_dependencies() -> None:
    """``npm ci`` from the committed lock file, once: node_modules/ is not in git."""
    if all((NODE_DIR / "node_modules" / "@grpc" / name).is_dir() for name in ("grpc-js", "proto-loader")):
        return
    npm = shutil.which("npm")
    assert npm is not None, "node is on PATH but npm is not: cannot install examples/node's dependencies"
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"


def test_node_client_selects_and_decodes_against_a_real_server() -> None:
    assert NODE is not None
    _install_dependencies()
    output = Output()
    with serve_process(output=output) as (_, target):
        run = subprocess.run(
            [NODE, str(NODE_DIR / "client.js"), "--target", target],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "node client: all checks passed", report
    assert not any(line.startswith("FAIL") for line in lines), report
    # Both sparse position decoders and the error paths were exercised, not skipped.
    assert any("ELIAS_FANO and POSITION_ENCODING_BITMAP" in line for line in lines), report
    assert any("INVALID_ARGUMENT" in line and "sparsity_level" in line for line in lines), report
    assert any("INITIAL_MODEL_NOT_HELD" in line for line in lines), report
