"""The contract's gates: buf lint, and buf breaking against the last released image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUF = str(ROOT / ".venv" / "bin" / "buf") if (ROOT / ".venv" / "bin" / "buf").exists() else "buf"
RELEASE = ROOT / "proto" / "releases" / "paramsel-v1-0.1.0.binpb"


def _breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUF, "breaking", "--against", str(RELEASE)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_current_contract_does_not_break_the_release() -> None:
    result = _breaking(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_removing_a_field_is_caught(tmp_path: Path) -> None:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto" / "paramsel", tmp_path / "proto" / "paramsel")
    tensor = tmp_path / "proto" / "paramsel" / "v1" / "tensor.proto"
    tensor.write_text(tensor.read_text().replace("  int64 offset_bytes = 2;\n", ""))
    result = _breaking(tmp_path)
    assert result.returncode != 0
    assert "offset_bytes" in result.stdout + result.stderr
