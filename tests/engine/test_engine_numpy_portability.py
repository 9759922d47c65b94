"""The engine's numpy paths give the same bits on numpy 1.24-1.26 (value-based casting of scalars) as on
numpy 2.x (NEP 50): comparisons run in the scores' own dtype, and seeded draws are pinned."""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch

from paramsel.engine import kth, sample_fedpm_masks, select_top_k_by_scores


def test_candidate_bounds_are_numpy_scalars_of_the_scores_dtype() -> None:
    for dtype, np_type in ((torch.float32, np.float32), (torch.float64, np.float64)):
        value = torch.tensor([0.1], dtype=dtype)[0]
        scalar = kth._numpy_scalar(value)
        assert type(scalar) is np_type
        assert scalar == np_type(0.1)


def test_candidate_path_selects_what_torch_selects_next_to_float64_neighbours() -> None:
    # float32 scores packed around float32(0.1) and its two neighbours, the answer among them: the
    # candidate path (numpy comparisons against the band's bounds) must select exactly what FL4Health's
    # torch comparison selects, one ulp either side included.
    t = np.float32(0.1)
    up, down = np.nextafter(t, np.float32(1)), np.nextafter(t, np.float32(0))
    rng = np.random.default_rng(5)
    base = rng.random(200_000, dtype=np.float32) * np.float32(0.09)  # all below the band
    near = np.array([t, up, down] * 300, dtype=np.float32)
    scores = {"a": torch.from_numpy(np.concatenate([near[:450], base[:100_000]])).reshape(-1, 10)}
    scores["b"] = torch.from_numpy(np.concatenate([base[100_000:], near[450:]]))
    state = {name: s.clone() + 1 for name, s in scores.items()}  # no zero values, so every pick is sent
    with mock.patch.multiple(kth, _SAMPLING_MIN_ENTRIES=0, _SAMPLE_SIZE=4096, _BAND_HALF_WIDTH=64):
        for k in (300, 600, 700, 900):
            sparsity = k / 200_900
            assert kth.find_kth(list(scores.values()), k, collect=True).candidates is not None
            result = select_top_k_by_scores(state, scores, sparsity_level=sparsity)
            # FL4Health: threshold from a full sort, then score >= threshold per tensor, in torch.
            flat = torch.cat([s.reshape(-1) for s in scores.values()])
            threshold = flat.sort(descending=True).values[result.k - 1].item()
            assert result.threshold == threshold
            expected = {
                name: torch.nonzero(s.reshape(-1) >= threshold).reshape(-1).tolist()
                for name, s in scores.items()
            }
            assert {sent.name: sent.positions.tolist() for sent in result.tensors} == expected
            assert result.selected_entries == sum(len(p) for p in expected.values())


def test_fedpm_masks_are_pinned_for_a_seed() -> None:
    # numpy's PCG64 stream and Generator.random() are the same on numpy 1.24-1.26 and 2.x.
    state = {"l.weight_scores": torch.linspace(-3, 3, 24).reshape(4, 6), "l.bias_scores": torch.zeros(5)}
    result = sample_fedpm_masks(state, seed=2024)
    assert result.names == ["l.weight_scores", "l.bias_scores"]
    assert [m.dtype for m in result.tensors] == [torch.int64, torch.int64]
    assert result.tensors[0].tolist() == [
        [0, 0, 0, 0, 0, 1],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 1, 1, 0, 1],
        [1, 1, 1, 1, 1, 1],
    ]
    assert result.tensors[1].tolist() == [1, 1, 0, 1, 1]
