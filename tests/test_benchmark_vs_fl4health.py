"""The pieces of issue 14's FL4Health comparison that decide its verdicts: the equality check, the spread
of repeated figures, and rows with a minimum to reach."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from benchmarks import fl4health
from benchmarks.models import conv_linear_pair, digest, new_round, state_entries
from benchmarks.report import Row, spread, spread_text
from benchmarks.vs_fl4health import SEED, _EmbeddedWorker, differences
from paramsel.client import ENV_TARGET, SparseCooParameterExchanger, largest_magnitude_change_scores


def _packed() -> list[np.ndarray]:
    return [
        np.array([0.5, -1.0], dtype=np.float32),
        np.array([[0, 1], [2, 0]], dtype=np.int64),
        np.array([3, 2], dtype=np.int64),
        np.array(["w"]),
    ]


def test_the_same_arrays_have_no_differences() -> None:
    assert differences(_packed(), _packed()) == []


def test_every_kind_of_difference_is_named() -> None:
    ours = _packed()
    ours[0] = np.array([0.5, -1.0], dtype=np.float64)  # dtype
    ours[1] = np.array([[0, 1], [2, 1]], dtype=np.int64)  # one index
    ours[2] = np.array([3, 2, 1], dtype=np.int64)  # shape
    ours[3] = np.array(["v"])  # name
    assert differences(ours, _packed()) == [
        "[0]: float64(2,), FL4Health float32(2,)",
        "[1]: different values",
        "[2]: int64(3,), FL4Health int64(2,)",
        "[3]: names ['v'], FL4Health ['w']",
    ]
    assert differences(_packed()[:3], _packed()) == ["3 arrays, FL4Health 4"]


def test_negative_zero_is_not_zero() -> None:
    ours = _packed()
    ours[0] = np.array([-0.0, -1.0], dtype=np.float32)
    theirs = _packed()
    theirs[0] = np.array([0.0, -1.0], dtype=np.float32)
    assert differences(ours, theirs) == ["[0]: different values"]


def test_spread_of_five_figures() -> None:
    figure = spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert figure == {
        "n": 5,
        "min": 1.0,
        "q1": 2.0,
        "median": 3.0,
        "q3": 4.0,
        "max": 5.0,
        "values": [5.0, 1.0, 4.0, 2.0, 3.0],
    }
    assert spread_text(figure, "s") == "min/median/max 1 / 3 / 5 s (n=5)"
    assert spread([2.5]) == {
        "n": 1,
        "min": 2.5,
        "q1": 2.5,
        "median": 2.5,
        "q3": 2.5,
        "max": 2.5,
        "values": [2.5],
    }


@pytest.mark.parametrize(("measured", "verdict"), [(25.0, "PASS"), (20.0, "PASS"), (19.9, "MISS")])
def test_a_row_with_a_minimum_passes_at_or_above_it(measured: float, verdict: str) -> None:
    row = Row("t", "title", measured, "x", minimum=20.0)
    assert row.verdict == verdict
    assert row.ratio == measured / 20.0


def test_issue_14s_model_has_50_1m_parameters_at_full_width() -> None:
    # 3*64*9 + 64 + 64*128*9 + 128 + 4 * (3536 * 3536 + 3536), counted without building the big one.
    assert 3 * 64 * 9 + 64 + 64 * 128 * 9 + 128 + 4 * (3536 * 3536 + 3536) == 50_102_976
    model, initial = conv_linear_pair(20, seed=0)
    assert state_entries(model) == 3 * 64 * 9 + 64 + 64 * 128 * 9 + 128 + 4 * (20 * 20 + 20)
    assert list(model.state_dict()) == list(initial.state_dict())
    assert all(
        (a != b).all()
        for a, b in zip(model.state_dict().values(), initial.state_dict().values(), strict=True)
    )


def test_without_fl4health_the_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(RuntimeError, match=r"make bench"):
        fl4health.exchanger(0.1)


def test_the_embedded_worker_pushes_what_this_process_pushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded default, in its own process, builds the same models and answers each round with the
    digest of the same packed list as a push here (the digest the comparison checks against FL4Health's)."""
    monkeypatch.delenv(ENV_TARGET, raising=False)
    worker = _EmbeddedWorker(8, SEED, tmp_path / "embedded.log")
    try:
        model, initial = conv_linear_pair(8, seed=SEED)
        exchanger = SparseCooParameterExchanger(0.1, largest_magnitude_change_scores)
        for round_ in range(2):
            new_round(initial, round_)
            seconds, theirs = worker.push(round_)
            assert seconds > 0
            assert theirs == digest(exchanger.push_parameters(model, initial))
    finally:
        worker.close()
