"""The O(N) k-th largest against a full sort, on both of its paths."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paramsel.engine import ScoreFunction, kth, select_top_k


def sorted_kth(scores: list[torch.Tensor], k: int) -> float:
    return torch.sort(torch.cat([s.flatten() for s in scores]), descending=True).values[k - 1].item()


def tiny_band() -> "mock._patch[object]":
    # Shrink the sample so that the band path runs, and sometimes misses, on small inputs.
    return mock.patch.multiple(kth, _SAMPLING_MIN_ENTRIES=0, _SAMPLE_SIZE=16, _BAND_HALF_WIDTH=1)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(-6, 6), min_size=0, max_size=40), min_size=1, max_size=4).filter(
        lambda parts: sum(map(len, parts)) > 0
    ),
    fraction=st.floats(0.0, 1.0, exclude_min=True),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64]),
)
@pytest.mark.slow  # fuzzes
def test_band_path_matches_sort(data: list[list[int]], fraction: float, dtype: torch.dtype) -> None:
    scores = [torch.tensor(part, dtype=dtype) / (4 if dtype.is_floating_point else 1) for part in data]
    k = math.ceil(sum(map(len, data)) * fraction)
    with tiny_band():
        assert kth.kth_largest(scores, k) == sorted_kth(scores, k)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(-6, 6), min_size=0, max_size=40), min_size=1, max_size=4).filter(
        lambda parts: sum(map(len, parts)) > 0
    ),
    fraction=st.floats(0.0, 1.0, exclude_min=True),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@pytest.mark.slow  # fuzzes
def test_collected_candidates_hold_every_entry_at_or_above_the_answer(
    data: list[list[int]], fraction: float, dtype: torch.dtype
) -> None:
    scores = [torch.tensor(part, dtype=dtype) / 4 for part in data]
    k = math.ceil(sum(map(len, data)) * fraction)
    with tiny_band(), mock.patch.object(kth, "_MAX_CANDIDATE_SHARE", 1.0):
        found = kth.find_kth(scores, k, collect=True)
    assert found.value == sorted_kth(scores, k)
    if found.candidates is None:
        return
    for score, (positions, values) in zip(scores, found.candidates, strict=True):
        flat = score.numpy()
        assert (values == flat[positions]).all()
        assert set(positions.tolist()) >= {int(i) for i in (flat >= found.value).nonzero()[0]}
        assert list(positions) == sorted(positions)


def test_candidates_are_collected_for_a_narrow_band_near_the_top() -> None:
    generator = torch.Generator().manual_seed(3)
    scores = [torch.rand(40_000, generator=generator), torch.rand(25_000, generator=generator)]
    k = 6_500
    with mock.patch.multiple(kth, _SAMPLING_MIN_ENTRIES=0, _SAMPLE_SIZE=4096, _BAND_HALF_WIDTH=256):
        found = kth.find_kth(scores, k, collect=True)
        counted = kth.find_kth(scores, k)
    assert found.value == counted.value == sorted_kth(scores, k)
    assert counted.candidates is None
    assert found.candidates is not None
    kept = sum(positions.size for positions, _ in found.candidates)
    assert k <= kept < 0.2 * 65_000  # about 10 % plus the band, far from all of them


def test_band_hits_on_distinct_values() -> None:
    scores = [torch.randperm(5000, generator=torch.Generator().manual_seed(1)).float()]
    with mock.patch.multiple(kth, _SAMPLE_SIZE=1024, _BAND_HALF_WIDTH=64):
        hit, _ = kth._kth_by_band(scores, 5000, 1234)
    assert hit is not None
    assert hit.item() == 5000 - 1234


def test_a_mass_of_ties_at_the_answer_is_counted_not_partitioned() -> None:
    scores = [torch.zeros(10_000), torch.arange(1, 101).float()]
    with mock.patch.multiple(kth, _SAMPLE_SIZE=256, _BAND_HALF_WIDTH=4):
        hit, _ = kth._kth_by_band(scores, 10_100, 5000)
    assert hit is not None
    assert hit.item() == 0.0


def test_mixed_dtypes_take_the_value_of_the_promoted_dtype() -> None:
    scores = [torch.tensor([3, 1]), torch.tensor([2.5], dtype=torch.float16)]
    assert kth.kth_largest(scores, 2) == 2.5
    assert kth.promoted_dtype(scores) == torch.float16


@pytest.mark.parametrize("zeros", [0.0, 0.9])
def test_large_model_takes_the_band_path_and_matches_sort(zeros: float) -> None:
    # Above the sampling cut-off, with and without a mass of unchanged weights (scores of exactly 0).
    generator = torch.Generator().manual_seed(7)
    current = {
        "a": torch.randn(700, 1000, generator=generator),
        "b": torch.randn(500_000, generator=generator),
    }
    initial = {}
    for name, w in current.items():
        unchanged = torch.rand(w.shape, generator=generator) < zeros
        initial[name] = torch.where(unchanged, w, w + torch.randn(w.shape, generator=generator))
    scores = [torch.abs(w - initial[name]) for name, w in current.items()]
    for level in (0.001, 0.1, 0.5, 0.95):
        result = select_top_k(
            current, initial, sparsity_level=level, score_function=ScoreFunction.LARGEST_MAGNITUDE_CHANGE
        )
        assert result.threshold == sorted_kth(scores, result.k)
