"""``SparseCooParameterExchanger``: paramsel's against FL4Health's, bit for bit, including attributes
assigned after construction (FL4Health reads them at every call, so paramsel must too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    SCORE_NAMES,
    FlSparseCooParameterExchanger,
    OneTensor,
    assert_packed_identical,
    assert_same_array,
    assert_states_identical,
    fl_score,
    model_pair,
    our_score,
    ours,
    twin,
)
from torch import nn

SPARSITY_LEVELS = [0.01, 0.1, 0.37, 0.5, 1.0]


def _assert_selection_identical(got: Any, expected: Any) -> None:
    """select_parameters' (values, (indices, shapes, names)), list by list."""
    values, (indices, shapes, names) = got
    e_values, (e_indices, e_shapes, e_names) = expected
    assert names == e_names
    assert all(type(name) is str for name in names)
    for what, a, b in (
        ("values", values, e_values),
        ("indices", indices, e_indices),
        ("shapes", shapes, e_shapes),
    ):
        assert isinstance(a, list)
        assert len(a) == len(b), what
        for name, x, y in zip(names, a, b, strict=True):
            assert_same_array(x, y, f"{what} of {name!r}")


def _compare(
    exchanger: ours.SparseCooParameterExchanger,
    oracle: FlSparseCooParameterExchanger,
    model: nn.Module,
    initial: nn.Module | None,
) -> list[np.ndarray]:
    """push and select of both on the same models; FL4Health's packed list is returned."""
    expected: list[np.ndarray] = oracle.push_parameters(model, initial)
    assert_packed_identical(exchanger.push_parameters(model, initial), expected)
    _assert_selection_identical(
        exchanger.select_parameters(model, initial), oracle.select_parameters(model, initial)
    )
    return expected


def _compare_pulls(
    exchanger: ours.SparseCooParameterExchanger,
    oracle: FlSparseCooParameterExchanger,
    packed: list[np.ndarray],
    start: nn.Module,
) -> None:
    mine, theirs = twin(start), twin(start)
    exchanger.pull_parameters(packed, mine)
    if len(packed) == 1:
        # Nothing was sent (e.g. only the 0-d num_batches_tracked made the cut). FL4Health's pull
        # fails its sanity assertion on an empty payload; paramsel's leaves the model as it was.
        with pytest.raises(AssertionError):
            oracle.pull_parameters(packed, theirs)
    else:
        oracle.pull_parameters(packed, theirs)
    assert_states_identical(mine, theirs)


@pytest.mark.parametrize("source", ["paramsel", "fl4health"])
@pytest.mark.parametrize("sparsity_level", SPARSITY_LEVELS)
@pytest.mark.parametrize("score_name", SCORE_NAMES)
def test_push_select_pull_match_fl4health(
    paramsel_target: str, score_name: str, sparsity_level: float, source: str
) -> None:
    """Every score function (paramsel's, and FL4Health's own passed to paramsel's exchanger) at several
    sparsity levels, on a Conv/BatchNorm/Linear model with int64 buffers, ties and exact zeros."""
    trained, initial = model_pair(seed=SCORE_NAMES.index(score_name))
    function = our_score(score_name) if source == "paramsel" else fl_score(score_name)
    exchanger = ours.SparseCooParameterExchanger(sparsity_level, function)
    oracle = FlSparseCooParameterExchanger(sparsity_level, fl_score(score_name))
    assert exchanger.criterion is not None  # FL4Health's own functions are recognised and served too
    packed = _compare(exchanger, oracle, trained, initial)
    # Pulls of FL4Health's payload, and of paramsel's own, into the initial model.
    _compare_pulls(exchanger, oracle, packed, initial)
    _compare_pulls(exchanger, oracle, exchanger.push_parameters(trained, initial), initial)
    # The compact payload expands to the same list.
    assert_packed_identical(ours.unpack_compact(exchanger.push_compact(trained, initial)), packed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pull_of_negative_zero_and_nan_matches_fl4health(dtype: type) -> None:
    """FL4Health densifies by adding the values into zeros: a -0.0 sent arrives as +0.0; a NaN keeps its
    bits; a float64 value too small for float32 arrives as its cast (-0.0 for -1e-320)."""
    values: np.ndarray = np.array([-0.0, np.nan, -1e-320 if dtype is np.float64 else -2.5, 7.0], dtype=dtype)
    packed = [values, np.array([[0, 0], [0, 2], [1, 1], [1, 2]]), np.array([2, 3]), np.array(["weight"])]
    start = OneTensor(weight=torch.full((2, 3), 5.0))
    scores = "largest_magnitude_change_scores"
    exchanger = ours.SparseCooParameterExchanger(0.5, our_score(scores))
    _compare_pulls(exchanger, FlSparseCooParameterExchanger(0.5, fl_score(scores)), packed, start)


@pytest.mark.parametrize("score_name", SCORE_NAMES)
def test_score_functions_called_directly_match_fl4health(score_name: str) -> None:
    trained, initial = model_pair(seed=3)
    got = our_score(score_name)(trained, initial)
    expected = fl_score(score_name)(trained, initial)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert_same_array(got[name].numpy(), expected[name].numpy(), f"scores of {name!r}")


def _reported_models() -> tuple[nn.Module, nn.Module]:
    return OneTensor(weight=torch.tensor([[3.0, 1.0]])), OneTensor(weight=torch.tensor([[3.0, 0.0]]))


@pytest.mark.parametrize("source", ["paramsel", "fl4health"])
def test_reported_score_function_assigned_after_construction(paramsel_target: str, source: str) -> None:
    score: Callable[[str], Any] = our_score if source == "paramsel" else fl_score
    model, initial = _reported_models()
    exchanger = ours.SparseCooParameterExchanger(0.5, score("largest_final_magnitude_scores"))
    oracle = FlSparseCooParameterExchanger(0.5, fl_score("largest_final_magnitude_scores"))
    packed = _compare(exchanger, oracle, model, initial)
    assert packed[0].tolist() == [3.0]
    assert packed[1].tolist() == [[0, 0]]

    exchanger.score_gen_function = score("largest_magnitude_change_scores")
    oracle.score_gen_function = fl_score("largest_magnitude_change_scores")
    packed = _compare(exchanger, oracle, model, initial)
    assert packed[0].tolist() == [1.0]  # FL4Health's answer in the report
    assert packed[1].tolist() == [[0, 1]]

    exchanger.sparsity_level = 1.0
    oracle.sparsity_level = 1.0
    packed = _compare(exchanger, oracle, model, initial)
    assert packed[0].tolist() == [3.0, 1.0]

    # ... and assigned again, back to where it started.
    exchanger.sparsity_level = oracle.sparsity_level = 0.5
    exchanger.score_gen_function = score("largest_final_magnitude_scores")
    oracle.score_gen_function = fl_score("largest_final_magnitude_scores")
    assert _compare(exchanger, oracle, model, initial)[0].tolist() == [3.0]


@pytest.mark.parametrize("source", ["paramsel", "fl4health"])
def test_reported_sparsity_level_assigned_after_construction(paramsel_target: str, source: str) -> None:
    score = our_score if source == "paramsel" else fl_score
    model, initial = _reported_models()
    exchanger = ours.SparseCooParameterExchanger(0.5, score("largest_magnitude_change_scores"))
    oracle = FlSparseCooParameterExchanger(0.5, fl_score("largest_magnitude_change_scores"))
    assert _compare(exchanger, oracle, model, initial)[0].tolist() == [1.0]
    exchanger.sparsity_level = oracle.sparsity_level = 1.0
    # |w - w0| = [0, 1]: both selected, the unchanged 3 included.
    assert _compare(exchanger, oracle, model, initial)[0].tolist() == [3.0, 1.0]


def _position_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """A caller's own score function: each entry's position in the state, so no ties."""
    scores, offset = {}, 0
    for name, tensor in model.state_dict().items():
        scores[name] = torch.arange(offset, offset + tensor.numel(), dtype=torch.float32).reshape(
            tensor.shape
        )
        offset += tensor.numel()
    return scores


def test_every_attribute_assigned_and_assigned_again(paramsel_target: str) -> None:
    """A sequence of assignments, each compared with FL4Health under the same assignment: sparsity
    levels, every score function (paramsel's and FL4Health's), a caller's own function and back."""
    trained, initial = model_pair(seed=11)
    exchanger = ours.SparseCooParameterExchanger(0.5, ours.largest_final_magnitude_scores)
    oracle = FlSparseCooParameterExchanger(0.5, fl_score("largest_final_magnitude_scores"))
    _compare(exchanger, oracle, trained, initial)
    steps: list[tuple[str, Any, Any]] = [("sparsity_level", level, level) for level in (1.0, 0.2, 0.05, 0.2)]
    for name in [*SCORE_NAMES, *reversed(SCORE_NAMES)]:
        steps.append(("score_gen_function", our_score(name), fl_score(name)))
        steps.append(("score_gen_function", fl_score(name), fl_score(name)))
    steps += [
        ("score_gen_function", _position_scores, _position_scores),
        ("sparsity_level", 0.3, 0.3),
        (
            "score_gen_function",
            ours.smallest_final_magnitude_scores,
            fl_score("smallest_final_magnitude_scores"),
        ),
        ("sparsity_level", 1, 1),
    ]
    for attribute, mine, theirs in steps:
        setattr(exchanger, attribute, mine)
        setattr(oracle, attribute, theirs)
        packed = _compare(exchanger, oracle, trained, initial)
        _compare_pulls(exchanger, oracle, packed, initial)


def test_criterion_follows_the_attributes() -> None:
    exchanger = ours.SparseCooParameterExchanger(0.5, ours.largest_final_magnitude_scores)
    assert exchanger.criterion == ours.TopK(0.5, ours.ScoreFunction.LARGEST_FINAL_MAGNITUDE)
    exchanger.sparsity_level = 0.25
    exchanger.score_gen_function = fl_score("smallest_increase_in_magnitude_scores")
    exchanger.exact_k = True
    assert exchanger.criterion == ours.TopK(
        0.25, ours.ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE, exact_k=True
    )
    exchanger.score_gen_function = _position_scores
    assert exchanger.criterion is None


def test_a_subclass_generate_parameter_scores_is_used(paramsel_target: str) -> None:
    """FL4Health's select_parameters calls self.generate_parameter_scores: an override wins over the
    score function, in paramsel's class too."""

    class Mine(ours.SparseCooParameterExchanger):
        def generate_parameter_scores(
            self, model: nn.Module, initial_model: nn.Module | None
        ) -> dict[str, Any]:
            return _position_scores(model, initial_model)

    class Theirs(FlSparseCooParameterExchanger):  # type: ignore[misc]  # FL4Health's classes are Any to mypy
        def generate_parameter_scores(
            self, model: nn.Module, initial_model: nn.Module | None
        ) -> dict[str, torch.Tensor]:
            return _position_scores(model, initial_model)

    trained, initial = model_pair(seed=5)
    exchanger = Mine(0.3, ours.largest_final_magnitude_scores)
    oracle = Theirs(0.3, fl_score("largest_final_magnitude_scores"))
    _compare(exchanger, oracle, trained, initial)


def test_parameter_packer_is_read_at_each_call(paramsel_target: str) -> None:
    class Counting:
        """Delegates to the packer it replaces, counting calls."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.packs, self.unpacks = inner, 0, 0

        def pack_parameters(self, weights: Any, extra: Any) -> Any:
            self.packs += 1
            return self.inner.pack_parameters(weights, extra)

        def unpack_parameters(self, packed: Any) -> Any:
            self.unpacks += 1
            return self.inner.unpack_parameters(packed)

        def extract_coo_info_from_dense(self, x: torch.Tensor) -> Any:
            return self.inner.extract_coo_info_from_dense(x)

    trained, initial = model_pair(seed=6)
    exchanger = ours.SparseCooParameterExchanger(0.2, ours.largest_magnitude_change_scores)
    oracle = FlSparseCooParameterExchanger(0.2, fl_score("largest_magnitude_change_scores"))
    mine, theirs = Counting(exchanger.parameter_packer), Counting(oracle.parameter_packer)
    exchanger.parameter_packer, oracle.parameter_packer = mine, theirs  # type: ignore[assignment]
    packed = _compare(exchanger, oracle, trained, initial)
    _compare_pulls(exchanger, oracle, packed, initial)
    assert (mine.packs, mine.unpacks) == (theirs.packs, theirs.unpacks) == (1, 1)
    # The packers themselves agree, COO extraction included.
    dense = torch.tensor([[0.0, 2.5, 0.0], [-1.0, 0.0, 4.0]])
    for a, b in zip(
        mine.inner.extract_coo_info_from_dense(dense),
        theirs.inner.extract_coo_info_from_dense(dense),
        strict=True,
    ):
        assert_same_array(a, b, "extract_coo_info_from_dense")


def test_exact_k_assigned_after_construction(paramsel_target: str) -> None:
    """paramsel's option, read at each call: off it is FL4Health's selection (all four ties go), on it
    is exactly k = ceil(4 * 0.5) = 2."""
    model = OneTensor(w=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    exchanger = ours.SparseCooParameterExchanger(0.5, ours.largest_final_magnitude_scores)
    oracle = FlSparseCooParameterExchanger(0.5, fl_score("largest_final_magnitude_scores"))
    assert len(_compare(exchanger, oracle, model, None)[0]) == 4
    exchanger.exact_k = True
    assert exchanger.push_parameters(model)[1].tolist() == [[0], [1]]
    exchanger.exact_k = False
    _compare(exchanger, oracle, model, None)


def test_pull_mode_assigned_after_construction() -> None:
    """paramsel's option, read at each pull: "scatter" keeps unsent coordinates; back to "replace"
    it is FL4Health's pull again; an unknown mode is refused at the pull, leaving the model alone."""
    trained, initial = model_pair(seed=8)
    oracle = FlSparseCooParameterExchanger(0.1, fl_score("largest_magnitude_change_scores"))
    packed = oracle.push_parameters(trained, initial)
    exchanger = ours.SparseCooParameterExchanger(0.1, ours.largest_magnitude_change_scores)
    exchanger.pull_mode = "scatter"
    scattered = twin(initial)
    exchanger.pull_parameters(packed, scattered)
    values, (indices, _, names) = oracle.parameter_packer.unpack_parameters(packed)
    expected = {name: tensor.clone() for name, tensor in initial.state_dict().items()}
    for v, i, name in zip(values, indices, names, strict=True):
        expected[name][tuple(torch.from_numpy(i).T)] = torch.from_numpy(v)
    for name, tensor in scattered.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    exchanger.pull_mode = "bogus"
    untouched = twin(initial)
    with pytest.raises(ValueError, match="pull_mode"):
        exchanger.pull_parameters(packed, untouched)
    assert_states_identical(untouched, initial)
    exchanger.pull_mode = "replace"
    _compare_pulls(exchanger, oracle, packed, initial)


def test_reuse_initial_model_and_client_assigned_after_construction(paramsel_target: str) -> None:
    trained, initial = model_pair(seed=9)
    exchanger = ours.SparseCooParameterExchanger(0.3, ours.largest_increase_in_magnitude_scores)
    oracle = FlSparseCooParameterExchanger(0.3, fl_score("largest_increase_in_magnitude_scores"))
    for reuse in (False, True, False):
        exchanger.reuse_initial_model = reuse
        _compare(exchanger, oracle, trained, initial)
    served = exchanger.client
    exchanger.client = ours.Client(
        connection=ours.Connection("127.0.0.1:1", max_attempts=1, timeout_seconds=30.0)
    )
    with pytest.raises(ours.ParamselError) as refused:
        exchanger.push_parameters(trained, initial)
    assert refused.value.status is ours.StatusCode.UNAVAILABLE
    exchanger.client = served
    _compare(exchanger, oracle, trained, initial)


@pytest.mark.parametrize("level", [0.0, -0.5, 1.5])
def test_a_sparsity_level_out_of_range_assigned_later_is_refused_at_the_call(level: float) -> None:
    """FL4Health fails at the call (an assertion, or an index past the scores); paramsel raises the
    ValueError its constructor raises for the same value, before calling anything."""
    trained, initial = model_pair(seed=10)
    exchanger = ours.SparseCooParameterExchanger(0.5, ours.largest_final_magnitude_scores)
    oracle = FlSparseCooParameterExchanger(0.5, fl_score("largest_final_magnitude_scores"))
    exchanger.sparsity_level = oracle.sparsity_level = level
    with pytest.raises((AssertionError, IndexError)):
        oracle.push_parameters(trained, initial)
    for call in (exchanger.push_parameters, exchanger.select_parameters, exchanger.push_compact):
        with pytest.raises(ValueError, match="sparsity_level must be in"):
            call(trained, initial)
