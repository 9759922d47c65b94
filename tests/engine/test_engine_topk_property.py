"""select_top_k against FL4Health's algorithm, written out naively: concatenate, sort, threshold."""

import math
from contextlib import AbstractContextManager, nullcontext
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paramsel.engine import ScoreFunction, kth, select_top_k

# A small pool of values makes ties (and exact zeros) common.
VALUES = st.one_of(
    st.sampled_from([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0]),
    st.floats(-4.0, 4.0, width=32),
)
SHAPES = st.sampled_from([(), (1,), (3,), (2, 2), (0,), (2, 3, 1)])
# Mostly float32, the usual model; other dtypes make the scores' promoted dtype differ from some tensors'.
DTYPES = st.sampled_from([torch.float32] * 4 + [torch.float64, torch.float16, torch.int64])


def threshold_path(path: str) -> AbstractContextManager[object]:
    """Forces one of the k-th largest search's paths on these small models."""
    if path == "partition":
        return nullcontext()
    share = 1.0 if path == "candidates" else 0.0
    return mock.patch.multiple(  # a tiny sample and band, so that these small models sample
        kth, _SAMPLING_MIN_ENTRIES=0, _SAMPLE_SIZE=8, _BAND_HALF_WIDTH=1, _MAX_CANDIDATE_SHARE=share
    )


def reference_scores(fn: ScoreFunction, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    if fn is ScoreFunction.LARGEST_FINAL_MAGNITUDE:
        return torch.abs(w)
    if fn is ScoreFunction.SMALLEST_FINAL_MAGNITUDE:
        return -torch.abs(w)
    if fn is ScoreFunction.LARGEST_MAGNITUDE_CHANGE:
        return torch.abs(w - w0)
    if fn is ScoreFunction.SMALLEST_MAGNITUDE_CHANGE:
        return -torch.abs(w - w0)
    if fn is ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE:
        return torch.abs(w) - torch.abs(w0)
    return -(torch.abs(w) - torch.abs(w0))


def reference_top_k(
    current: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], level: float, fn: ScoreFunction
) -> tuple[float, int, dict[str, tuple[list[float], list[int]]]]:
    scores = {name: reference_scores(fn, w, initial[name]) for name, w in current.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = math.ceil(flat.numel() * level)
    threshold = torch.sort(flat, descending=True).values[k - 1].item()
    selected = sum(int((s >= threshold).sum()) for s in scores.values())
    sent = {}
    for name, w in current.items():
        if w.dim() == 0:
            continue
        masked = torch.where(scores[name] >= threshold, w, torch.zeros_like(w)).flatten()
        positions = torch.nonzero(masked).flatten()
        if positions.numel():
            sent[name] = (masked[positions].tolist(), positions.tolist())
    return threshold, selected, sent


@st.composite
def models(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=4))
    current: dict[str, torch.Tensor] = {}
    initial: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(shapes):
        size = math.prod(shape)
        dtype = draw(DTYPES)
        for state in (current, initial):
            values = draw(st.lists(VALUES, min_size=size, max_size=size))
            state[f"t{i}"] = torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype)
    return current, initial


@settings(max_examples=600, deadline=None)
@given(
    model=models(),
    level=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    fn=st.sampled_from(list(ScoreFunction)),
    path=st.sampled_from(["partition", "counting", "candidates"]),
)
def test_matches_the_sorting_reference(
    model: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], level: float, fn: ScoreFunction, path: str
) -> None:
    current, initial = model
    if sum(t.numel() for t in current.values()) == 0:
        return
    threshold, selected, expected = reference_top_k(current, initial, level, fn)
    with threshold_path(path):
        result = select_top_k(current, initial, sparsity_level=level, score_function=fn)
    assert result.threshold == threshold
    assert result.selected_entries == selected
    got = {t.name: (t.values.tolist(), t.positions.tolist()) for t in result.tensors}
    assert got == expected
