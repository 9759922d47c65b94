"""An idle server gives back the memory its finished calls used.

Before, 12 sequential pushes of 50 M parameters left the idle server at 1,062 MB (236 MB before them):
glibc's rising mmap threshold kept the freed blocks in its heaps. `paramsel serve` now fixes the
threshold (paramsel.server.memory); the image sets MALLOC_MMAP_THRESHOLD_ as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import proc_status, serve_process, wait_for

from paramsel.client import Client, Connection, ScoreFunction, TopK
from paramsel.server.memory import ENV, return_freed_memory

PARAMETERS = 50_000_000
PUSHES = 12


def _idle_rss_mb(pid: int, log: Path, pushes: int) -> float:
    """RSS once the server has logged ``pushes`` Push calls: a call's line is written once its handler
    has ended and let go of what it held, after its answer has left."""
    wait_for(
        lambda: log.read_text(errors="replace").count('"method":"Push"') >= pushes,
        what=f"{pushes} Push lines in the server's log",
    )
    return proc_status(pid, "VmRSS") / 2**20


@pytest.mark.slow  # a `paramsel serve` process given 12 pushes of 50 M parameters
@pytest.mark.timeout(900)  # ~1 min on 2 idle cores; the bound only catches a hang
def test_idle_rss_after_12_pushes_of_50m_parameters_stays_within_1_5x(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)  # the server's own setting, not the image's variable
    criterion = TopK(0.1, ScoreFunction.LARGEST_FINAL_MAGNITUDE)
    # No initial model: nothing is kept in the server's model cache between the pushes, so whatever
    # stays is what the allocator kept.
    generator = torch.Generator().manual_seed(10)
    small = {"w": torch.randn(1000, generator=generator)}
    model = {"w": torch.randn(PARAMETERS, generator=generator)}
    log = tmp_path / "serve.log"
    with serve_process(log=log) as (proc, target):
        client = Client(connection=Connection(target, timeout_seconds=600))
        client.push(criterion, small)  # everything a call imports or caches once is in "before"
        before = _idle_rss_mb(proc.pid, log, 1)
        for _ in range(PUSHES):
            result = client.push(criterion, model)
            # The top 10 % came back, with any entries tied at the threshold (FL4Health sends them all).
            assert PARAMETERS // 10 <= result.arrays[0][1].numel() <= PARAMETERS // 10 + 100
        after = _idle_rss_mb(proc.pid, log, 1 + PUSHES)
        assert proc.poll() is None
    assert after <= 1.5 * before, f"idle RSS {before:.0f} MB before {PUSHES} pushes, {after:.0f} MB after"


def test_the_threshold_is_set_or_left_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert return_freed_memory() is True  # glibc on these machines
    monkeypatch.setenv(ENV, "65536")
    assert return_freed_memory() is True  # the operator's value stands; nothing is called
