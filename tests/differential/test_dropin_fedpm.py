"""``FedPmExchanger`` and ``select_scores_and_sample_masks``: paramsel's against FL4Health's.

FL4Health samples its masks with an unseeded ``scipy.stats.bernoulli``, so a random draw is compared by
what is sent (names, order, shapes, dtypes, 0/1 values); draws that are certain (probability exactly 0
or 1 in float32), and every pull, are compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl4health.model_bases.masked_layers.masked_conv import MaskedConv2d
from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear
from helpers import (
    FlDynamicLayerExchanger,
    FlFedPmExchanger,
    assert_packed_identical,
    assert_same_array,
    assert_states_identical,
    fl_criteria,
    ours,
    twin,
)
from torch import nn

SCORE_NAMES = ["0.weight_scores", "0.bias_scores", "2.weight_scores", "2.bias_scores", "3.weight_scores"]


def _masked_model(seed: int = 0) -> nn.Module:
    """FL4Health's masked layers (a conv, two linears, one without bias) around a BatchNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(
        MaskedConv2d(1, 2, 3), nn.BatchNorm2d(2), MaskedLinear(4, 3), MaskedLinear(3, 2, bias=False)
    )


def _certain(model: nn.Module) -> nn.Module:
    """Scores of +-100: sigmoid is exactly 1.0 or about 4e-44 in float32, so every draw is certain."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("_scores"):
                pattern = torch.arange(tensor.numel()).reshape(tensor.shape) % 3 == 0
                tensor.copy_(torch.where(pattern, 100.0, -100.0))
    return model


def _assert_same_draw_layout(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Same names in the same order, and masks of the same shapes and dtypes, holding 0s and 1s."""
    assert len(got) == len(expected)
    assert_same_array(got[-1], expected[-1], "names")
    for name, a, b in zip(expected[-1].tolist(), got[:-1], expected[:-1], strict=True):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert set(np.unique(a).tolist()) <= {0, 1}, name


def test_random_draws_send_what_fl4health_sends(paramsel_target: str) -> None:
    model = _masked_model()
    expected = FlFedPmExchanger().push_parameters(model)
    assert expected[-1].tolist() == SCORE_NAMES
    exchanger = ours.FedPmExchanger()
    _assert_same_draw_layout(exchanger.push_parameters(model), expected)
    arrays, names = exchanger.select_parameters(model)
    e_arrays, e_names = FlFedPmExchanger().select_parameters(model)
    _assert_same_draw_layout([*arrays, np.array(names)], [*e_arrays, np.array(e_names)])


@pytest.mark.parametrize("seed", [None, 3])
def test_certain_draws_match_bit_for_bit(paramsel_target: str, seed: int | None) -> None:
    model = _certain(_masked_model())
    expected = FlFedPmExchanger().push_parameters(model)
    assert_packed_identical(ours.FedPmExchanger(seed=seed).push_parameters(model), expected)
    # FL4Health's selection function passed to paramsel's exchangers, and paramsel's called directly.
    assert_packed_identical(
        ours.DynamicLayerExchanger(fl_criteria.select_scores_and_sample_masks).push_parameters(model),
        expected,
    )
    arrays, names = ours.select_scores_and_sample_masks(model, None)
    assert_packed_identical([*arrays, np.array(names)], expected)


def _probabilities(model: nn.Module) -> list[np.ndarray]:
    """Aggregated mask probabilities as a server sends them back: 0 and 1 (infinite scores), halves,
    tiny and near-1 values; one of them in float64 and one as int64 counts, which FL4Health takes too."""
    state = model.state_dict()
    arrays: list[np.ndarray] = []
    for position, name in enumerate(SCORE_NAMES):
        n = state[name].numel()
        values = np.linspace(0.0, 1.0, n, dtype=np.float32).reshape(tuple(state[name].shape))
        values.flat[n // 2] = np.float32(1e-7)
        if position == 1:
            values = values.astype(np.float64)
        if position == 4:
            values = (values > 0.5).astype(np.int64)
        arrays.append(values)
    return [*arrays, np.array(SCORE_NAMES)]


def test_pull_applies_the_inverse_sigmoid_as_fl4health_does() -> None:
    model = _masked_model(seed=1)
    payload = _probabilities(model)
    mine, theirs = twin(model), twin(model)
    ours.FedPmExchanger().pull_parameters(payload, mine)
    FlFedPmExchanger().pull_parameters(payload, theirs)
    assert_states_identical(mine, theirs)
    # A round trip of certain masks: 1 -> +inf, 0 -> -inf, in both.
    certain = _certain(_masked_model(seed=2))
    packed = FlFedPmExchanger().push_parameters(certain)
    mine, theirs = twin(model), twin(model)
    ours.FedPmExchanger().pull_parameters(packed, mine)
    FlFedPmExchanger().pull_parameters(packed, theirs)
    assert_states_identical(mine, theirs)


def test_seed_assigned_after_construction(paramsel_target: str) -> None:
    """paramsel's seed is read at each call: assigned, it makes the draws repeatable, and the same
    seed gives the same masks as an exchanger built with it."""
    model = _masked_model(seed=4)
    exchanger = ours.FedPmExchanger()
    exchanger.seed = 5
    first = exchanger.push_parameters(model)
    assert_packed_identical(exchanger.push_parameters(model), first)
    assert_packed_identical(ours.FedPmExchanger(seed=5).push_parameters(model), first)
    exchanger.seed = 6
    assert_packed_identical(
        exchanger.push_parameters(model), ours.FedPmExchanger(seed=6).push_parameters(model)
    )
    assert exchanger.criterion == ours.FedPm(seed=6)
    exchanger.seed = 5  # assigned again
    assert_packed_identical(exchanger.push_parameters(model), first)
    # The seed also applies to FL4Health's own selection function, assigned in its place.
    exchanger.layer_selection_function = fl_criteria.select_scores_and_sample_masks
    assert_packed_identical(exchanger.push_parameters(model), first)
    exchanger.seed = None
    assert exchanger.criterion == ours.FedPm(seed=None)
    _assert_same_draw_layout(exchanger.push_parameters(model), first)


def test_layer_selection_function_assigned_to_fedpm_exchangers(paramsel_target: str) -> None:
    """FL4Health's FedPmExchanger calls whatever ``layer_selection_function`` holds at the call; so does
    paramsel's, pulls still through the inverse sigmoid."""
    model, initial = _masked_model(seed=5), _masked_model(seed=6)
    exchanger, oracle = ours.FedPmExchanger(seed=1), FlFedPmExchanger()
    fl_threshold = fl_criteria.LayerSelectionFunctionConstructor(0.05, 0.5, True, True).select_by_threshold()
    threshold = ours.LayerSelectionFunctionConstructor(0.05, 0.5, True, True).select_by_threshold()
    for mine in (threshold, fl_threshold, threshold):
        exchanger.layer_selection_function = mine
        oracle.layer_selection_function = fl_threshold
        expected = oracle.push_parameters(model, initial)
        assert len(expected) > 2
        assert_packed_identical(exchanger.push_parameters(model, initial), expected)
        # Pulled back through the inverse sigmoid (weights outside (0, 1) give NaN in both).
        probabilities = [np.abs(np.tanh(a)).astype(a.dtype) for a in expected[:-1]] + [expected[-1]]
        for payload in (expected, probabilities):
            a, b = twin(initial), twin(initial)
            exchanger.pull_parameters(payload, a)
            oracle.pull_parameters(payload, b)
            assert_states_identical(a, b)
    for mine in (ours.select_scores_and_sample_masks, fl_criteria.select_scores_and_sample_masks):
        exchanger.layer_selection_function = mine
        oracle.layer_selection_function = fl_criteria.select_scores_and_sample_masks
        _assert_same_draw_layout(exchanger.push_parameters(model), oracle.push_parameters(model))


def test_fedpm_selection_in_a_dynamic_layer_exchanger(paramsel_target: str) -> None:
    """FedPM's selection function in the plain DynamicLayerExchanger: masks out, plain replacement in."""
    model = _certain(_masked_model(seed=7))
    for function in (ours.select_scores_and_sample_masks, fl_criteria.select_scores_and_sample_masks):
        exchanger = ours.DynamicLayerExchanger(function)
        assert exchanger.criterion is not None
        oracle = FlDynamicLayerExchanger(fl_criteria.select_scores_and_sample_masks)
        expected = oracle.push_parameters(model)
        assert_packed_identical(exchanger.push_parameters(model), expected)
        a, b = twin(model), twin(model)
        exchanger.pull_parameters(expected, a)
        oracle.pull_parameters(expected, b)
        assert_states_identical(a, b)
