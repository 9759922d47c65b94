"""Every criterion through the drop-in SDK and a real server, against values computed by hand."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from support import StateModule
from torch import nn

from paramsel.client import (
    DynamicLayerExchanger,
    FedPmExchanger,
    LayerSelectionFunctionConstructor,
    ParamselError,
    SparseCooParameterExchanger,
    StatusCode,
    largest_final_magnitude_scores,
    largest_magnitude_change_scores,
    select_layers_by_percentage,
    select_layers_by_threshold,
    smallest_final_magnitude_scores,
    unpack_compact,
)
from paramsel.server.app import RunningServer


def _tie_model() -> StateModule:
    # |scores|: w [1, 5, 3, 0.5], b [2, 3], n 7 (0-d int64), cnt [4, 0] -> N = 9.
    return StateModule(
        {
            "w": torch.tensor([[1.0, -5.0], [3.0, 0.5]]),
            "b": torch.tensor([2.0, -3.0]),
            "n": torch.tensor(7),
            "cnt": torch.tensor([4, 0]),
        }
    )


def test_top_k_ties_int64_buffer_and_0d(server: RunningServer) -> None:
    # k = ceil(9 * 0.4) = 4; sorted scores 7, 5, 4, 3, 3, ... -> threshold 3; both 3s tie, so 5 are
    # selected; n is 0-d (selected, never sent).
    exchanger = SparseCooParameterExchanger(0.4, largest_final_magnitude_scores, target=server.target)
    packed = exchanger.push_parameters(_tie_model())
    assert len(packed) == 10
    values, indices, shapes, names = packed[:3], packed[3:6], packed[6:9], packed[9]
    assert names.tolist() == ["w", "b", "cnt"]
    np.testing.assert_array_equal(values[0], np.array([-5.0, 3.0], dtype=np.float32))
    np.testing.assert_array_equal(values[1], np.array([-3.0], dtype=np.float32))
    np.testing.assert_array_equal(values[2], np.array([4], dtype=np.int64))
    assert values[0].dtype == np.float32
    assert values[2].dtype == np.int64
    np.testing.assert_array_equal(indices[0], np.array([[0, 1], [1, 0]]))
    np.testing.assert_array_equal(indices[1], np.array([[1]]))
    np.testing.assert_array_equal(indices[2], np.array([[0]]))
    assert all(i.dtype == np.int64 for i in indices)
    for shape, expected in zip(shapes, ([2, 2], [2], [2]), strict=True):
        np.testing.assert_array_equal(shape, np.array(expected))


def test_select_parameters_returns_fl4health_tuple(server: RunningServer) -> None:
    exchanger = SparseCooParameterExchanger(0.4, largest_final_magnitude_scores, target=server.target)
    values, (indices, shapes, names) = exchanger.select_parameters(_tie_model())
    assert names == ["w", "b", "cnt"]
    assert [v.tolist() for v in values] == [[-5.0, 3.0], [-3.0], [4]]
    assert [i.tolist() for i in indices] == [[[0, 1], [1, 0]], [[1]], [[0]]]
    assert [s.tolist() for s in shapes] == [[2, 2], [2], [2]]


def test_smallest_scores_select_the_small_end(server: RunningServer) -> None:
    # -|w| over [1, 5, 3, 0.5, 2, 3, 7, 4, 0]: k = ceil(9 * 0.2) = 2; the 2 largest of -|w| are 0 and
    # -0.5, so the threshold is -0.5: cnt's 0 is selected but not sent (exact zero), w's 0.5 is sent.
    exchanger = SparseCooParameterExchanger(0.2, smallest_final_magnitude_scores, target=server.target)
    values, (indices, _, names) = exchanger.select_parameters(_tie_model())
    assert names == ["w"]
    assert values[0].tolist() == [0.5]
    assert indices[0].tolist() == [[1, 1]]


def test_half_precision_dtypes(server: RunningServer) -> None:
    # |h| = [1.5, 0.25, 2], |bf| = [4, 0.125]; k = ceil(5 * 0.4) = 2 -> threshold 2.
    model = StateModule(
        {
            "h": torch.tensor([1.5, -0.25, 2.0], dtype=torch.float16),
            "bf": torch.tensor([[-4.0, 0.125]], dtype=torch.bfloat16),
        }
    )
    exchanger = SparseCooParameterExchanger(0.4, largest_final_magnitude_scores, target=server.target)
    values, (indices, _, names) = exchanger.select_parameters(model)
    assert names == ["h", "bf"]
    assert values[0].dtype == np.float16
    assert values[0].tolist() == [2.0]
    # numpy has no bfloat16: the SDK hands it over as float32, exactly.
    assert values[1].dtype == np.float32
    assert values[1].tolist() == [-4.0]
    assert [i.tolist() for i in indices] == [[[2]], [[0, 0]]]


def test_magnitude_change_needs_initial_model(server: RunningServer) -> None:
    exchanger = SparseCooParameterExchanger(0.5, largest_magnitude_change_scores, target=server.target)
    with pytest.raises(ParamselError) as err:
        exchanger.push_parameters(_tie_model())
    assert err.value.status is StatusCode.FAILED_PRECONDITION
    assert "initial model" in err.value.message


def test_magnitude_change_against_initial(server: RunningServer) -> None:
    current = StateModule({"w": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    initial = StateModule({"w": torch.tensor([1.0, 0.0, 3.5, 0.0])})
    # |w - w0| = [0, 2, 0.5, 4]; k = ceil(4 * 0.5) = 2 -> threshold 2 -> positions 1 and 3.
    exchanger = SparseCooParameterExchanger(0.5, largest_magnitude_change_scores, target=server.target)
    values, (indices, _, _) = exchanger.select_parameters(current, initial)
    assert values[0].tolist() == [2.0, 4.0]
    assert indices[0].tolist() == [[1], [3]]


def _drift_models() -> tuple[StateModule, StateModule]:
    # Drifts ||w - w0|| (normalised by numel): a 5 (2.5), b 2 (0.5), c 0 (0), d 0 (0).
    current = StateModule(
        {
            "a": torch.tensor([3.0, 4.0]),
            "b": torch.ones(4),
            "c": torch.tensor([7.0]),
            "d": torch.tensor([1.0]),
        }
    )
    initial = StateModule(
        {"a": torch.zeros(2), "b": torch.zeros(4), "c": torch.tensor([7.0]), "d": torch.tensor([1.0])}
    )
    return current, initial


@pytest.mark.parametrize(
    ("threshold", "normalize", "more", "expected"),
    [
        (1.0, True, True, ["a"]),
        (1.0, True, False, ["b", "c", "d"]),
        (1.0, False, True, ["a", "b"]),
        (2.0, False, True, ["a"]),  # drift 2 is not > 2
        (2.0, False, False, ["b", "c", "d"]),  # ... but is <= 2
    ],
)
def test_layers_by_threshold(
    server: RunningServer, threshold: float, normalize: bool, more: bool, expected: list[str]
) -> None:
    current, initial = _drift_models()
    constructor = LayerSelectionFunctionConstructor(threshold, 0.5, normalize, more, target=server.target)
    packed = DynamicLayerExchanger(constructor.select_by_threshold()).push_parameters(current, initial)
    assert packed[-1].tolist() == expected
    for array, name in zip(packed[:-1], expected, strict=True):
        np.testing.assert_array_equal(array, current.state_dict()[name].numpy())


@pytest.mark.parametrize(
    ("percentage", "more", "expected"),
    [
        (0.5, True, ["a", "b"]),  # ceil(4 * 0.5) = 2, largest drift first
        (0.5, False, ["c", "d"]),  # the two zero drifts, tie kept in state order
        (0.75, False, ["c", "d", "b"]),  # ceil(3) = 3, in ascending drift order
        (0.1, True, ["a"]),  # ceil(0.4) = 1
    ],
)
def test_layers_by_percentage(
    server: RunningServer, percentage: float, more: bool, expected: list[str]
) -> None:
    current, initial = _drift_models()
    constructor = LayerSelectionFunctionConstructor(1.0, percentage, True, more, target=server.target)
    arrays, names = DynamicLayerExchanger(constructor.select_by_percentage()).select_parameters(
        current, initial
    )
    assert names == expected
    assert len(arrays) == len(expected)


def test_layer_pull_replaces_named_tensors(server: RunningServer) -> None:
    _, initial = _drift_models()
    exchanger = DynamicLayerExchanger(
        LayerSelectionFunctionConstructor(1.0, 0.5, target=server.target).select_by_threshold()
    )
    exchanger.pull_parameters([np.array([9.0, 8.0]), np.array(["a"])], initial)
    assert initial.state_dict()["a"].tolist() == [9.0, 8.0]
    assert initial.state_dict()["b"].tolist() == [0.0] * 4


def test_fedpm_masks_and_inverse_sigmoid_pull(server: RunningServer) -> None:
    model = StateModule(
        {
            "weight": torch.ones(2, 2),
            "weight_scores": torch.tensor([[100.0, -100.0], [100.0, 100.0]]),
            "bias_scores": torch.tensor([-100.0]),
        }
    )
    exchanger = FedPmExchanger(seed=7, target=server.target)
    packed = exchanger.push_parameters(model)
    # sigmoid(100) is 1.0 in float32 and sigmoid(-100) about 4e-44, so the draw is certain.
    assert packed[-1].tolist() == ["weight_scores", "bias_scores"]
    assert packed[0].dtype == np.int64
    assert packed[0].tolist() == [[1, 0], [1, 1]]
    assert packed[1].tolist() == [0]
    assert exchanger.push_parameters(model)[0].tolist() == packed[0].tolist()
    # Pull maps probabilities through -log(1/x - 1): 0.5 -> 0, 0.880797 -> 2, 0.119203 -> -2.
    probabilities = np.array([[0.5, 0.880797], [0.119203, 0.5]], dtype=np.float32)
    exchanger.pull_parameters([probabilities, np.array([0.5], dtype=np.float32), packed[-1]], model)
    np.testing.assert_allclose(model.weight_scores.detach().numpy(), [[0.0, 2.0], [-2.0, 0.0]], atol=1e-4)
    assert model.bias_scores.item() == 0.0
    assert model.weight.tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize(
    ("mode", "expected"), [("replace", [[0.0, 0.0], [10.0, 0.0]]), ("scatter", [[1.0, 2.0], [10.0, 4.0]])]
)
def test_sparse_pull_modes(server: RunningServer, mode: str, expected: list[list[float]]) -> None:
    model = StateModule({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "v": torch.tensor([5.0])})
    exchanger = SparseCooParameterExchanger(
        0.5, largest_final_magnitude_scores, target=server.target, pull_mode=mode
    )
    payload = [np.array([10.0]), np.array([[1, 0]]), np.array([2, 2]), np.array(["w"])]
    exchanger.pull_parameters(payload, model)
    assert model.w.tolist() == expected
    assert model.v.tolist() == [5.0]


def test_tensor_larger_than_grpc_message_limit(server: RunningServer) -> None:
    # 2,000,000 float32 = 8 MB, twice gRPC's default 4 MiB message limit: it must travel in chunks.
    big = torch.arange(2_000_000, dtype=torch.float32)
    model = StateModule({"big": big})
    exchanger = SparseCooParameterExchanger(0.001, largest_final_magnitude_scores, target=server.target)
    packed = exchanger.push_parameters(model)
    # k = 2000: the values 1,998,000 ... 1,999,999 at the same positions.
    np.testing.assert_array_equal(packed[0], np.arange(1_998_000, 2_000_000, dtype=np.float32))
    np.testing.assert_array_equal(packed[1][:, 0], np.arange(1_998_000, 2_000_000))
    target = StateModule({"big": torch.full((2_000_000,), -1.0)})
    exchanger.pull_parameters(packed, target)
    assert target.big[:1_998_000].abs().sum().item() == 0.0
    assert torch.equal(target.big[1_998_000:], big[1_998_000:])
    # A whole 8 MB layer comes back intact too.
    layers = DynamicLayerExchanger(
        LayerSelectionFunctionConstructor(1e-9, 1.0, target=server.target).select_by_threshold()
    )
    arrays, names = layers.select_parameters(model, StateModule({"big": torch.zeros(2_000_000)}))
    assert names == ["big"]
    np.testing.assert_array_equal(arrays[0], big.numpy())


def test_real_module_with_batchnorm(server: RunningServer) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    packed = SparseCooParameterExchanger(
        1.0, largest_final_magnitude_scores, target=server.target
    ).push_parameters(model)
    # Every non-zero entry goes; running_mean (all zeros) and num_batches_tracked (0-d) do not.
    assert packed[-1].tolist() == ["0.weight", "0.bias", "1.weight", "1.running_var"]
    assert packed[3].dtype == np.float32  # BatchNorm weight
    assert packed[3].tolist() == [1.0, 1.0]


def test_a_callers_own_score_function_is_selected_by_the_service() -> None:
    # Scores: the position in the state, so w [0, 1, 2, 3], b [4, 5], n 6, cnt [7, 8]; N = 9.
    # k = ceil(9 * 0.4) = 4: threshold 5, so b[1] (5), n (6, 0-d: never sent) and cnt [7, 8].
    def position_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
        scores, offset = {}, 0
        for name, t in model.state_dict().items():
            scores[name] = torch.arange(offset, offset + t.numel(), dtype=torch.float32).reshape(t.shape)
            offset += t.numel()
        return scores

    exchanger = SparseCooParameterExchanger(0.4, position_scores)
    packed = exchanger.push_parameters(_tie_model())
    assert packed[-1].tolist() == ["b", "cnt"]
    assert packed[0].tolist() == [-3.0]
    assert packed[1].tolist() == [4]  # cnt [4, 0]: the selected 0 is dropped, as FL4Health drops it
    assert packed[2].tolist() == [[1]]
    assert packed[3].tolist() == [[0]]
    # The compact payload of the same selection, encoded by the service, expands to the same list.
    again = unpack_compact(exchanger.push_compact(_tie_model()))
    assert [a.tolist() for a in again] == [a.tolist() for a in packed]


def test_a_function_that_borrows_a_name_keeps_its_own_scores() -> None:
    # Named like paramsel's (and FL4Health's) largest_final_magnitude_scores, but scoring -|w|:
    # k = ceil(9 * 0.2) = 2 takes cnt[1] (0, so not sent) and w[1, 1] (0.5). |w| would send w[0, 1].
    def largest_final_magnitude_scores(
        model: nn.Module, initial_model: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        return {k: -v.abs() for k, v in model.state_dict().items()}

    packed = SparseCooParameterExchanger(0.2, largest_final_magnitude_scores).push_parameters(_tie_model())
    assert packed[-1].tolist() == ["w"]
    assert packed[0].tolist() == [0.5]
    assert packed[1].tolist() == [[1, 1]]


def test_fl4health_own_function_is_served(server: RunningServer) -> None:
    def largest_final_magnitude_scores(
        model: nn.Module, initial_model: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        raise AssertionError("never called: the server scores")

    # FL4Health's own function, as its module says: recognised by name and applied by the server.
    largest_final_magnitude_scores.__module__ = "fl4health.parameter_exchange.sparse_coo_parameter_exchanger"
    exchanger = SparseCooParameterExchanger(0.4, largest_final_magnitude_scores, target=server.target)
    assert exchanger.push_parameters(_tie_model())[-1].tolist() == ["w", "b", "cnt"]


def test_a_callers_own_scores_are_checked() -> None:
    # Scores for w alone take part alone (as in FL4Health); scores of another shape are refused.
    def misshapen(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(4)}

    with pytest.raises(ParamselError, match=r"SECTION_SCORES 'w': shape \[4\] differs") as refused:
        SparseCooParameterExchanger(0.5, misshapen).push_parameters(_tie_model())
    assert refused.value.status == StatusCode.INVALID_ARGUMENT


def test_a_callers_own_layer_selection_function_is_called() -> None:
    current, initial = _drift_models()

    def first_and_last(
        model: nn.Module, initial_model: nn.Module | None
    ) -> tuple[list[np.ndarray], list[str]]:
        state = model.state_dict()
        names = [next(iter(state)), list(state)[-1]]
        return [state[n].numpy() for n in names], names

    exchanger = DynamicLayerExchanger(first_and_last)
    packed = exchanger.push_parameters(current, initial)
    assert packed[-1].tolist() == ["a", "d"]
    assert packed[0].tolist() == [3.0, 4.0]
    assert packed[1].tolist() == [1.0]


def test_an_infinite_norm_threshold_selects_by_the_drift_test(server: RunningServer) -> None:
    current, initial = _drift_models()
    for more, expected in ((True, []), (False, ["a", "b", "c", "d"])):
        constructor = LayerSelectionFunctionConstructor(float("inf"), 0.5, True, more, target=server.target)
        _, names = DynamicLayerExchanger(constructor.select_by_threshold()).select_parameters(
            current, initial
        )
        assert names == expected
    with pytest.raises(ValueError, match="norm_threshold must be > 0"):
        LayerSelectionFunctionConstructor(float("nan"), 0.5)


def test_score_functions_called_directly_raise_paramsel_errors() -> None:
    with pytest.raises(ParamselError) as refused:
        largest_magnitude_change_scores(_tie_model(), None)
    assert refused.value.status == StatusCode.FAILED_PRECONDITION


def test_pull_of_a_0d_tensor_and_of_indices_that_fit_no_shape() -> None:
    # FL4Health densifies a 0-d entry (indices of shape (1, 0)) like any other: n becomes 9.
    model = _tie_model()
    exchanger = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    exchanger.pull_parameters(
        [np.array([9]), np.zeros((1, 0), dtype=np.int64), np.array([], dtype=np.int64), np.array(["n"])],
        model,
    )
    assert model.state_dict()["n"].tolist() == 9
    with pytest.raises(ParamselError, match="indices of shape \\(3,\\) do not fit a 2-d tensor") as refused:
        exchanger.pull_parameters(
            [np.array([9.0, 1.0]), np.array([0, 1, 2]), np.array([2, 2]), np.array(["w"])], model
        )
    assert refused.value.status == StatusCode.INVALID_ARGUMENT


def test_fl4health_module_level_layer_selection_functions(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARAMSEL_TARGET", server.target)
    current, initial = _drift_models()
    # Drifts normalised: a 2.5, b 0.5, c 0, d 0 (see _drift_models).
    arrays, names = select_layers_by_threshold(1.0, True, True, current, initial)
    assert names == ["a"]
    assert arrays[0].tolist() == [3.0, 4.0]
    assert select_layers_by_threshold(1.0, True, False, current, initial)[1] == ["b", "c", "d"]
    assert select_layers_by_percentage(0.5, True, True, current, initial)[1] == ["a", "b"]
    # As FL4Health's constructor builds them: partials of the module functions, served by the service.
    exchanger = DynamicLayerExchanger(functools.partial(select_layers_by_percentage, 0.75, True, False))
    assert exchanger.push_parameters(current, initial)[-1].tolist() == ["c", "d", "b"]
