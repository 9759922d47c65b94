"""FedPM mask sampling."""

import pytest
import torch

from paramsel.engine import InvalidArgument, sample_fedpm_masks

STATE = {
    "fc1.weight": torch.randn(2, 2),
    "fc1.weight_scores": torch.tensor([[200.0, -200.0], [200.0, -200.0]]),
    "fc1.bias_scores": torch.zeros(64),
    "fc1.scores": torch.zeros(3),
    "weight_scores": torch.tensor(200.0),
}


def test_only_score_tensors_in_state_order() -> None:
    result = sample_fedpm_masks(STATE, seed=1)
    assert result.names == ["fc1.weight_scores", "fc1.bias_scores", "weight_scores"]
    assert result.drifts == {}


def test_masks_are_int64_zero_one_of_the_score_shape() -> None:
    result = sample_fedpm_masks(STATE, seed=1)
    for name, mask in zip(result.names, result.tensors, strict=True):
        assert mask.dtype == torch.int64
        assert mask.shape == STATE[name].shape
        assert set(mask.flatten().tolist()) <= {0, 1}


def test_saturated_scores_give_certain_masks() -> None:
    # sigmoid(200) == 1 and sigmoid(-200) == 0 exactly in float32.
    result = sample_fedpm_masks(STATE, seed=3)
    assert result.tensors[0].tolist() == [[1, 0], [1, 0]]
    assert result.tensors[2].dim() == 0
    assert result.tensors[2].item() == 1


def test_same_seed_same_masks_other_seed_other_masks() -> None:
    first = sample_fedpm_masks(STATE, seed=42).tensors[1]
    again = sample_fedpm_masks(STATE, seed=42).tensors[1]
    other = sample_fedpm_masks(STATE, seed=43).tensors[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # 64 fair coins agree with probability 2**-64


def test_probability_one_half_is_about_half() -> None:
    mask = sample_fedpm_masks({"bias_scores": torch.zeros(20_000)}, seed=0).tensors[0]
    assert 0.48 < mask.double().mean().item() < 0.52


def test_no_score_tensors_give_an_empty_result() -> None:
    result = sample_fedpm_masks({"fc.weight": torch.ones(2)}, seed=0)
    assert (result.names, result.tensors) == ([], [])


def test_nan_score_and_bad_seed_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="'weight_scores'"):
        sample_fedpm_masks({"weight_scores": torch.tensor([0.0, float("nan")])}, seed=0)
    with pytest.raises(InvalidArgument, match="seed"):
        sample_fedpm_masks(STATE, seed=-1)
