"""Rows of the results table, the machine they ran on, and the JSON written next to them."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

FEATURE_MISSING = "n/a (feature missing)"


@dataclass
class Row:
    """One target: what was measured, the limit it must not exceed or the minimum it must reach (if
    any), and the verdict. ``ratio`` is measured / limit, or measured / minimum."""

    target: str
    title: str
    measured: float | None
    unit: str
    limit: float | None = None
    verdict: str = ""
    note: str = ""
    ratio: float | None = field(default=None)
    minimum: float | None = None

    def __post_init__(self) -> None:
        bound = self.limit or self.minimum
        if self.measured is not None and bound:
            self.ratio = self.measured / bound
        if not self.verdict:
            if self.measured is None:
                self.verdict = "ERROR"
            elif self.limit is not None:
                self.verdict = "PASS" if self.measured <= self.limit else "MISS"
            elif self.minimum is not None:
                self.verdict = "PASS" if self.measured >= self.minimum else "MISS"
            else:
                self.verdict = "INFO"


def spread(values: list[float]) -> dict[str, Any]:
    """min, quartiles, median and max of repeated figures (the quartiles by the "inclusive" method)."""
    ordered = sorted(values)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "n": len(ordered),
        "min": ordered[0],
        "q1": q1,
        "median": statistics.median(ordered),
        "q3": q3,
        "max": ordered[-1],
        "values": list(values),
    }


def spread_text(figure: dict[str, Any], unit: str = "", digits: int = 3) -> str:
    """``min / median / max`` of a :func:`spread`, for a table note."""
    parts = [f"{figure[key]:.{digits}g}" for key in ("min", "median", "max")]
    return f"min/median/max {' / '.join(parts)}{' ' + unit if unit else ''} (n={figure['n']})"


def missing(target: str, title: str, unit: str, what: str, limit: float | None = None) -> Row:
    """A row for a feature this build does not have yet."""
    return Row(target, title, None, unit, limit, verdict=FEATURE_MISSING, note=f"needs {what}")


def failed(target: str, title: str, unit: str, error: BaseException) -> Row:
    return Row(target, title, None, unit, verdict="ERROR", note=f"{type(error).__name__}: {error}"[:300])


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if value == int(value) and abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def _bound(row: Row) -> str:
    if row.limit is not None:
        return f"<= {_fmt(row.limit, row.unit)}"
    if row.minimum is not None:
        return f">= {_fmt(row.minimum, row.unit)}"
    return "-"


def table(rows: list[Row]) -> str:
    """The results as a fixed-width table (markdown-compatible)."""
    header = ["target", "measured", "limit", "ratio", "verdict", "note"]
    lines = [
        [
            row.title,
            _fmt(row.measured, row.unit),
            _bound(row),
            "-" if row.ratio is None else f"{row.ratio:.2f}",
            row.verdict,
            row.note,
        ]
        for row in rows
    ]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header) - 1)]

    def render(cells: list[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
        return "| " + " | ".join([*padded, cells[-1]]) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|---|"
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def _mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": _mem_total_bytes(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(
    path: Path, mode: str, sizes: dict[str, Any], rows: list[Row], figures: dict[str, Any], seconds: float
) -> None:
    document = {
        "mode": mode,
        "machine": machine(),
        "sizes": sizes,
        "wall_seconds": round(seconds, 1),
        "targets": {row.target: asdict(row) for row in rows},
        "figures": figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(document), indent=2) + "\n")
