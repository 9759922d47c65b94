"""An idle server gives back the memory its finished calls used; `paramsel serve` runs with glibc's malloc
tuned for it (huge pages, a fixed mmap threshold), unless the operator chose otherwise.

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
from paramsel.server.memory import (
    ENV,
    MMAP_THRESHOLD_BYTES,
    TUNABLES_ENV,
    allocator_environment,
    return_freed_memory,
)

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
    monkeypatch.delenv(TUNABLES_ENV, raising=False)
    assert return_freed_memory() is True  # glibc on these machines
    monkeypatch.setenv(ENV, "65536")
    assert return_freed_memory() is True  # the operator's value stands; nothing is called
    monkeypatch.delenv(ENV)
    monkeypatch.setenv(TUNABLES_ENV, "glibc.malloc.mmap_threshold=65536")
    assert return_freed_memory() is True  # the operator's tunable stands too


GLIBC = ("glibc", "2.36")
TUNED = f"glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold={MMAP_THRESHOLD_BYTES}"


def test_the_server_environment_adds_huge_pages_and_the_threshold() -> None:
    assert allocator_environment({"PATH": "/bin"}, GLIBC) == {"PATH": "/bin", TUNABLES_ENV: TUNED}
    assert MMAP_THRESHOLD_BYTES == 4 * 2**20
    # Other tunables are kept, ours appended after them.
    assert allocator_environment({TUNABLES_ENV: "glibc.pthread.rseq=0"}, GLIBC) == {
        TUNABLES_ENV: f"glibc.pthread.rseq=0:{TUNED}"
    }


def test_the_operators_choices_stand() -> None:
    # Huge pages chosen (on or off): nothing to add, no restart.
    assert allocator_environment({TUNABLES_ENV: "glibc.malloc.hugetlb=0"}, GLIBC) is None
    # A threshold chosen either way: only huge pages are added.
    assert allocator_environment({ENV: "131072"}, GLIBC) == {
        ENV: "131072",
        TUNABLES_ENV: "glibc.malloc.hugetlb=1",
    }
    chosen = {TUNABLES_ENV: "glibc.malloc.mmap_threshold=65536"}
    assert allocator_environment(chosen, GLIBC) == {
        TUNABLES_ENV: "glibc.malloc.mmap_threshold=65536:glibc.malloc.hugetlb=1"
    }


@pytest.mark.parametrize("libc", [("glibc", "2.34"), ("", ""), ("musl", "1.2"), ("glibc", "unknown")])
def test_no_restart_where_the_tunable_does_not_exist(libc: tuple[str, str]) -> None:
    assert allocator_environment({}, libc) is None


def _environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def test_paramsel_serve_restarts_itself_with_the_tunables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same pid (``exec``), announced and serving; its environment asks for huge pages."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(TUNABLES_ENV, raising=False)
    with serve_process() as (proc, target):
        tunables = _environment_of(proc.pid).get(TUNABLES_ENV, "")
        # glibc may rewrite the variable as it reads it: the huge-page tunable is always kept first.
        assert tunables.startswith("glibc.malloc.hugetlb=1"), tunables
        small = {"w": torch.arange(1000, dtype=torch.float32)}
        result = Client(target=target).push(TopK(0.1, ScoreFunction.LARGEST_FINAL_MAGNITUDE), small)
        assert result.arrays[0][1].tolist() == list(range(900, 1000))


def test_paramsel_serve_leaves_an_operators_tunables_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TUNABLES_ENV, "glibc.malloc.hugetlb=0")
    with serve_process() as (proc, _target):
        assert _environment_of(proc.pid)[TUNABLES_ENV] == "glibc.malloc.hugetlb=0"
