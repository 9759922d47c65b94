"""``DynamicLayerExchanger`` and ``LayerSelectionFunctionConstructor``: paramsel's against FL4Health's,
bit for bit, including attributes assigned after construction."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    FlDynamicLayerExchanger,
    OneTensor,
    assert_packed_identical,
    assert_same_array,
    assert_states_identical,
    fl_criteria,
    model_pair,
    ours,
    twin,
)
from torch import nn

FlConstructor = fl_criteria.LayerSelectionFunctionConstructor
PERCENTAGES = [0.05, 0.25, 0.5, 0.66, 0.9, 1.0]
THRESHOLD_PICKS = [
    "tiny",
    "smallest drift",
    "median drift",
    "between two drifts",
    "largest drift",
    "above all",
]


def _drifts(model: nn.Module, initial: nn.Module, normalize: bool) -> list[float]:
    """FL4Health's own drift of every state entry, sorted."""
    states, past = model.state_dict(), initial.state_dict()
    return sorted(fl_criteria._calculate_drift_norm(states[n], past[n], normalize) for n in states)


def _threshold(pick: str, drifts: list[float]) -> float:
    """Thresholds equal to drifts test FL4Health's strict > (and <=) exactly at the boundary."""
    positive = [d for d in drifts if d > 0]
    middle = positive[len(positive) // 2]
    return {
        "tiny": 1e-12,
        "smallest drift": positive[0],
        "median drift": middle,
        "between two drifts": (middle + positive[len(positive) // 2 + 1]) / 2,
        "largest drift": positive[-1],
        "above all": positive[-1] * 2,
    }[pick]


def _compare(
    exchanger: ours.DynamicLayerExchanger,
    oracle: FlDynamicLayerExchanger,
    model: nn.Module,
    initial: nn.Module,
) -> list[np.ndarray]:
    """push, select and pull of both; FL4Health's packed list is returned."""
    expected: list[np.ndarray] = oracle.push_parameters(model, initial)
    assert_packed_identical(exchanger.push_parameters(model, initial), expected)
    arrays, names = exchanger.select_parameters(model, initial)
    e_arrays, e_names = oracle.select_parameters(model, initial)
    assert names == list(e_names)
    assert len(arrays) == len(e_arrays)
    for name, a, b in zip(names, arrays, e_arrays, strict=True):
        assert_same_array(a, b, f"layer {name!r}")
    mine, theirs = twin(initial), twin(initial)
    exchanger.pull_parameters(expected, mine)
    oracle.pull_parameters(expected, theirs)
    assert_states_identical(mine, theirs)
    return expected


def _functions(source: str, how: str, value: float, normalize: bool, more: bool) -> tuple[Any, Any]:
    """(the function paramsel's exchanger gets, FL4Health's): built by paramsel's constructor or by
    FL4Health's (passed into paramsel's exchanger as it is)."""
    threshold, percentage = (value, 0.5) if how == "threshold" else (1.0, value)
    theirs = getattr(FlConstructor(threshold, percentage, normalize, more), f"select_by_{how}")()
    if source == "fl4health":
        return theirs, theirs
    constructor = ours.LayerSelectionFunctionConstructor(threshold, percentage, normalize, more)
    return getattr(constructor, f"select_by_{how}")(), theirs


@pytest.mark.parametrize("source", ["paramsel", "fl4health"])
@pytest.mark.parametrize("more", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pick", THRESHOLD_PICKS)
def test_by_threshold_matches_fl4health(
    paramsel_target: str, pick: str, normalize: bool, more: bool, source: str
) -> None:
    trained, initial = model_pair(seed=21)
    threshold = _threshold(pick, _drifts(trained, initial, normalize))
    mine, theirs = _functions(source, "threshold", threshold, normalize, more)
    _compare(ours.DynamicLayerExchanger(mine), FlDynamicLayerExchanger(theirs), trained, initial)


@pytest.mark.parametrize("source", ["paramsel", "fl4health"])
@pytest.mark.parametrize("more", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("percentage", PERCENTAGES)
def test_by_percentage_matches_fl4health(
    paramsel_target: str, percentage: float, normalize: bool, more: bool, source: str
) -> None:
    # The two num_batches_tracked buffers drift by exactly 2 each: a tie the ranking must keep in order.
    trained, initial = model_pair(seed=22)
    mine, theirs = _functions(source, "percentage", percentage, normalize, more)
    _compare(ours.DynamicLayerExchanger(mine), FlDynamicLayerExchanger(theirs), trained, initial)


@pytest.mark.parametrize("source", ["paramsel", "fl4health"])
def test_reported_new_layer_selection_function_assigned(paramsel_target: str, source: str) -> None:
    """3x3 ones against zeros, threshold 2: the drift is 3, or 1/3 normalised. A fresh function from a
    constructor whose ``normalize`` changed, assigned to the exchanger, must take effect."""
    model, initial = OneTensor(weight=torch.ones(3, 3)), OneTensor(weight=torch.zeros(3, 3))
    constructor = (ours.LayerSelectionFunctionConstructor if source == "paramsel" else FlConstructor)(
        2.0, 0.5, normalize=False
    )
    fl_constructor = FlConstructor(2.0, 0.5, normalize=False)
    exchanger = ours.DynamicLayerExchanger(constructor.select_by_threshold())
    oracle = FlDynamicLayerExchanger(fl_constructor.select_by_threshold())
    assert _compare(exchanger, oracle, model, initial)[-1].tolist() == ["weight"]
    constructor.normalize = fl_constructor.normalize = True
    exchanger.layer_selection_function = constructor.select_by_threshold()
    oracle.layer_selection_function = fl_constructor.select_by_threshold()
    packed = _compare(exchanger, oracle, model, initial)
    assert packed[-1].tolist() == []  # FL4Health sends no layer
    # ... and assigned again.
    constructor.normalize = fl_constructor.normalize = False
    exchanger.layer_selection_function = constructor.select_by_threshold()
    oracle.layer_selection_function = fl_constructor.select_by_threshold()
    assert _compare(exchanger, oracle, model, initial)[-1].tolist() == ["weight"]


# Values FL4Health's constructor would refuse, but takes once assigned after construction.
LATE_VALUES: dict[str, list[Any]] = {
    "norm_threshold": [1e-4, 0.05, 1.0, 0.0, -1.0, float("nan"), float("inf"), 0.05],
    "exchange_percentage": [0.3, 1.0, 0.1, 1.5, 0.0, -0.4, 0.5],
    "normalize": [False, True, False],
    "select_drift_more": [False, True, False],
}


@pytest.mark.parametrize("attribute", list(LATE_VALUES))
@pytest.mark.parametrize("source", ["paramsel", "fl4health"])
def test_constructor_fields_assigned_after_construction(
    paramsel_target: str, attribute: str, source: str
) -> None:
    """FL4Health's constructor binds its fields into a ``functools.partial`` when select_by_threshold()
    or select_by_percentage() is called: an assignment changes the functions built after it, never
    those built before. Each value is assigned, then assigned again."""
    trained, initial = model_pair(seed=23)
    ours_class = ours.LayerSelectionFunctionConstructor if source == "paramsel" else FlConstructor
    constructor, fl_constructor = ours_class(0.01, 0.5), FlConstructor(0.01, 0.5)
    for how in ("threshold", "percentage"):
        exchanger = ours.DynamicLayerExchanger(getattr(constructor, f"select_by_{how}")())
        oracle = FlDynamicLayerExchanger(getattr(fl_constructor, f"select_by_{how}")())
        before = exchanger.layer_selection_function
        for value in LATE_VALUES[attribute]:
            setattr(constructor, attribute, value)
            setattr(fl_constructor, attribute, value)
            # The function built before the assignment still selects with the old values.
            assert exchanger.layer_selection_function is before
            _compare(exchanger, oracle, trained, initial)
        for value in LATE_VALUES[attribute]:
            setattr(constructor, attribute, value)
            setattr(fl_constructor, attribute, value)
            exchanger.layer_selection_function = getattr(constructor, f"select_by_{how}")()
            oracle.layer_selection_function = getattr(fl_constructor, f"select_by_{how}")()
            _compare(exchanger, oracle, trained, initial)


@pytest.mark.parametrize(("percentage", "error"), [(float("nan"), ValueError), (float("inf"), OverflowError)])
def test_a_percentage_no_count_can_come_from_fails_as_in_fl4health(
    paramsel_target: str, percentage: float, error: type[Exception]
) -> None:
    trained, initial = model_pair(seed=24)
    constructor, fl_constructor = ours.LayerSelectionFunctionConstructor(1.0, 0.5), FlConstructor(1.0, 0.5)
    constructor.exchange_percentage = fl_constructor.exchange_percentage = percentage
    with pytest.raises(error):
        FlDynamicLayerExchanger(fl_constructor.select_by_percentage()).push_parameters(trained, initial)
    with pytest.raises(error):
        ours.DynamicLayerExchanger(constructor.select_by_percentage()).push_parameters(trained, initial)


@pytest.mark.parametrize("threshold", [0.05, 0.0, -1.0, float("nan")])
@pytest.mark.parametrize("percentage", [0.4, 1.0, 2.0, 0.0, -0.3])
def test_module_level_functions_match_fl4health(
    paramsel_target: str, threshold: float, percentage: float
) -> None:
    """FL4Health's module functions take any value; so do paramsel's, with the same results."""
    trained, initial = model_pair(seed=25)
    for normalize in (True, False):
        for more in (True, False):
            pairs = [
                (
                    ours.select_layers_by_threshold(threshold, normalize, more, trained, initial),
                    fl_criteria.select_layers_by_threshold(threshold, normalize, more, trained, initial),
                ),
                (
                    ours.select_layers_by_percentage(percentage, normalize, more, trained, initial),
                    fl_criteria.select_layers_by_percentage(percentage, normalize, more, trained, initial),
                ),
            ]
            for (arrays, names), (e_arrays, e_names) in pairs:
                assert names == e_names
                for name, a, b in zip(names, arrays, e_arrays, strict=True):
                    assert_same_array(a, b, f"layer {name!r}")


@pytest.mark.parametrize("module", ["paramsel", "fl4health"])
def test_partials_of_the_module_functions(paramsel_target: str, module: str) -> None:
    """Bound positionally, as FL4Health's constructor binds them, a partial is recognised and served.
    Bound by keyword, the exchanger's positional (model, initial_model) collide with the keywords: it
    fails in FL4Health, and it fails the same way in paramsel (the function is called, not served)."""
    trained, initial = model_pair(seed=26)
    source = ours if module == "paramsel" else fl_criteria
    for name, value in (("select_layers_by_threshold", 0.02), ("select_layers_by_percentage", 0.4)):
        function, fl_function = getattr(source, name), getattr(fl_criteria, name)
        for normalize, more in ((True, True), (False, False), (True, False)):
            exchanger = ours.DynamicLayerExchanger(functools.partial(function, value, normalize, more))
            assert exchanger.criterion is not None  # recognised, so the service selects
            oracle = FlDynamicLayerExchanger(functools.partial(fl_function, value, normalize, more))
            _compare(exchanger, oracle, trained, initial)
        keyword = functools.partial(function, value, normalize=True, select_drift_more=False)
        fl_keyword = functools.partial(fl_function, value, normalize=True, select_drift_more=False)
        exchanger = ours.DynamicLayerExchanger(keyword)
        assert exchanger.criterion is None
        with pytest.raises(TypeError, match="multiple values"):
            FlDynamicLayerExchanger(fl_keyword).push_parameters(trained, initial)
        with pytest.raises(TypeError, match="multiple values"):
            exchanger.push_parameters(trained, initial)


def _first_and_last(model: nn.Module, initial_model: nn.Module | None) -> tuple[list[np.ndarray], list[str]]:
    """A caller's own layer selection function."""
    state = model.state_dict()
    names = [next(iter(state)), list(state)[-1]]
    return [state[n].cpu().numpy() for n in names], names


def test_layer_selection_function_reassigned_across_kinds(paramsel_target: str) -> None:
    """Served functions, a caller's own, FL4Health's functions and back, on one exchanger."""
    trained, initial = model_pair(seed=27)
    exchanger = ours.DynamicLayerExchanger(
        ours.LayerSelectionFunctionConstructor(0.01, 0.3).select_by_threshold()
    )
    oracle = FlDynamicLayerExchanger(FlConstructor(0.01, 0.3).select_by_threshold())
    _compare(exchanger, oracle, trained, initial)
    steps = [
        (_first_and_last, _first_and_last),
        (FlConstructor(0.01, 0.3, False, False).select_by_percentage(),) * 2,
        (
            ours.LayerSelectionFunctionConstructor(0.5, 0.7, True, False).select_by_percentage(),
            FlConstructor(0.5, 0.7, True, False).select_by_percentage(),
        ),
        (
            functools.partial(ours.select_layers_by_threshold, 0.0, False, True),
            functools.partial(fl_criteria.select_layers_by_threshold, 0.0, False, True),
        ),
        (_first_and_last, _first_and_last),
    ]
    for mine, theirs in steps:
        exchanger.layer_selection_function = mine
        oracle.layer_selection_function = theirs
        _compare(exchanger, oracle, trained, initial)


def test_a_layer_selection_functions_criterion_is_read_at_each_call(paramsel_target: str) -> None:
    trained, initial = model_pair(seed=28)
    function = ours.LayerSelectionFunctionConstructor(0.01, 0.3).select_by_threshold()
    exchanger = ours.DynamicLayerExchanger(function)
    function.criterion = (
        ours.LayerSelectionFunctionConstructor(0.01, 0.6, False, False).select_by_percentage().criterion
    )
    oracle = FlDynamicLayerExchanger(FlConstructor(0.01, 0.6, False, False).select_by_percentage())
    _compare(exchanger, oracle, trained, initial)
    assert exchanger.criterion is function.criterion


def test_a_subclass_select_parameters_is_used_by_push(paramsel_target: str) -> None:
    class Mine(ours.DynamicLayerExchanger):
        def select_parameters(
            self, model: nn.Module, initial_model: nn.Module | None = None
        ) -> tuple[list[np.ndarray], list[str]]:
            arrays, names = super().select_parameters(model, initial_model)
            return arrays[::-1], names[::-1]

    class Theirs(FlDynamicLayerExchanger):  # type: ignore[misc]  # FL4Health's classes are Any to mypy
        def select_parameters(
            self, model: nn.Module, initial_model: nn.Module | None = None
        ) -> tuple[list[np.ndarray], list[str]]:
            arrays, names = super().select_parameters(model, initial_model)
            return arrays[::-1], names[::-1]

    trained, initial = model_pair(seed=29)
    exchanger = Mine(ours.LayerSelectionFunctionConstructor(0.01, 0.5).select_by_percentage())
    oracle = Theirs(FlConstructor(0.01, 0.5).select_by_percentage())
    packed = _compare(exchanger, oracle, trained, initial)
    assert len(packed) > 2


def test_parameter_packer_is_read_at_each_call(paramsel_target: str) -> None:
    class Reversing:
        """Packs the layers in reverse order (names too): a packer of the caller's own."""

        def pack_parameters(self, weights: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
            return [*weights[::-1], np.array(names[::-1])]

        def unpack_parameters(self, packed: list[np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
            return packed[:-1], packed[-1].tolist()

    trained, initial = model_pair(seed=30)
    exchanger = ours.DynamicLayerExchanger(
        ours.LayerSelectionFunctionConstructor(0.01, 0.5).select_by_percentage()
    )
    oracle = FlDynamicLayerExchanger(FlConstructor(0.01, 0.5).select_by_percentage())
    plain = _compare(exchanger, oracle, trained, initial)
    exchanger.parameter_packer = oracle.parameter_packer = Reversing()  # type: ignore[assignment]
    reversed_packed = _compare(exchanger, oracle, trained, initial)
    assert reversed_packed[-1].tolist() == plain[-1].tolist()[::-1]


def test_empty_tensors_and_nan_drifts(paramsel_target: str) -> None:
    """An empty tensor's normalised drift is 0/0 = NaN: no threshold selects it, in either direction."""
    model = OneTensor(a=torch.tensor([1.0, 2.0]), empty=torch.zeros(0), b=torch.tensor([0.5]))
    initial = OneTensor(a=torch.zeros(2), empty=torch.zeros(0), b=torch.zeros(1))
    for more in (True, False):
        for threshold in (0.1, 0.7, 5.0):
            function = FlConstructor(threshold, 1.0, True, more).select_by_threshold()
            _compare(ours.DynamicLayerExchanger(function), FlDynamicLayerExchanger(function), model, initial)
    assert math.isnan(fl_criteria._calculate_drift_norm(torch.zeros(0), torch.zeros(0), True))
