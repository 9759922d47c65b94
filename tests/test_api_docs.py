"""Every public name of paramsel.client is documented, and docs/api.md says what the code says."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import paramsel.client

ROOT = Path(__file__).resolve().parents[1]


def test_every_export_has_a_docstring_and_a_reference_entry() -> None:
    reference = (ROOT / "docs" / "api.md").read_text()
    for name in paramsel.client.__all__:
        value = getattr(paramsel.client, name)
        if callable(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
        assert f"### `{name}" in reference, f"{name} is missing from docs/api.md"


def test_reference_page_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "api_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
