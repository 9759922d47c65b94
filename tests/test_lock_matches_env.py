"""requirements/dev.lock is what the project's venv holds, and what requirements/constraints.txt pins.

The environment check runs only in the project's own venv (.venv, built by `make setup` from the lock):
the compatibility job's environments (scripts/compat.sh) and users' are meant to differ from it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_lock.py"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_lock_keeps_the_constraints_pins_and_cpu_torch() -> None:
    result = _check("--lock-only")
    assert result.returncode == 0, result.stdout + result.stderr


def test_project_venv_holds_exactly_the_lock() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"not the project's venv ({sys.prefix}); only .venv is built from the lock")
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr
