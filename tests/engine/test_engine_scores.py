"""The six score functions and the layout checks they rely on."""

import pytest
import torch

from paramsel.engine import (
    FailedPrecondition,
    InvalidArgument,
    ScoreFunction,
    check_same_layout,
    score_tensors,
)

CURRENT = {"a": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([[-0.5, 0.0]])}
INITIAL = {"a": torch.tensor([2.0, 1.0, -3.0]), "b": torch.tensor([[0.5, -1.0]])}

EXPECTED = {
    ScoreFunction.LARGEST_FINAL_MAGNITUDE: ([1.0, 2.0, 3.0], [[0.5, 0.0]]),
    ScoreFunction.SMALLEST_FINAL_MAGNITUDE: ([-1.0, -2.0, -3.0], [[-0.5, 0.0]]),
    ScoreFunction.LARGEST_MAGNITUDE_CHANGE: ([1.0, 3.0, 6.0], [[1.0, 1.0]]),
    ScoreFunction.SMALLEST_MAGNITUDE_CHANGE: ([-1.0, -3.0, -6.0], [[-1.0, -1.0]]),
    ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE: ([-1.0, 1.0, 0.0], [[0.0, -1.0]]),
    ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE: ([1.0, -1.0, 0.0], [[0.0, 1.0]]),
}


@pytest.mark.parametrize("fn", list(ScoreFunction))
def test_each_score_function_on_a_two_tensor_model(fn: ScoreFunction) -> None:
    scores = score_tensors(fn, CURRENT, INITIAL)
    expected_a, expected_b = EXPECTED[fn]
    assert list(scores) == ["a", "b"]
    assert torch.equal(scores["a"], torch.tensor(expected_a))
    assert torch.equal(scores["b"], torch.tensor(expected_b))


def test_which_functions_need_the_initial_model() -> None:
    needs = {fn.value for fn in ScoreFunction if fn.needs_initial_model}
    assert needs == {
        "largest_magnitude_change",
        "smallest_magnitude_change",
        "largest_increase_in_magnitude",
        "smallest_increase_in_magnitude",
    }


@pytest.mark.parametrize("fn", [fn for fn in ScoreFunction if fn.needs_initial_model])
def test_missing_initial_model_is_a_failed_precondition(fn: ScoreFunction) -> None:
    with pytest.raises(FailedPrecondition, match="needs the initial model"):
        score_tensors(fn, CURRENT, None)


def test_final_magnitude_ignores_the_initial_model() -> None:
    scores = score_tensors(ScoreFunction.LARGEST_FINAL_MAGNITUDE, CURRENT, None)
    assert torch.equal(scores["a"], torch.tensor([1.0, 2.0, 3.0]))


def test_scores_keep_the_tensor_dtype_and_wrap_like_torch() -> None:
    current = {"n": torch.tensor([5, -7]), "u": torch.tensor([3], dtype=torch.uint8)}
    initial = {"n": torch.tensor([9, 1]), "u": torch.tensor([5], dtype=torch.uint8)}
    scores = score_tensors(ScoreFunction.LARGEST_MAGNITUDE_CHANGE, current, initial)
    assert scores["n"].dtype == torch.int64
    assert scores["n"].tolist() == [4, 8]
    assert scores["u"].tolist() == [254]  # 3 - 5 wraps to 254 in uint8


def test_bool_tensor_is_rejected_naming_it() -> None:
    with pytest.raises(InvalidArgument, match=r"'mask'.*bool"):
        score_tensors(ScoreFunction.LARGEST_FINAL_MAGNITUDE, {"mask": torch.tensor([True, False])}, None)


def test_dtype_torch_cannot_score_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="'u16'"):
        score_tensors(
            ScoreFunction.LARGEST_FINAL_MAGNITUDE, {"u16": torch.tensor([1], dtype=torch.uint16)}, None
        )


def test_layout_accepts_a_different_order() -> None:
    check_same_layout(CURRENT, {"b": INITIAL["b"], "a": INITIAL["a"]})


@pytest.mark.parametrize(
    ("initial", "message"),
    [
        ({"a": INITIAL["a"]}, r"initial model has no tensor 'b'"),
        ({**INITIAL, "c": torch.zeros(1)}, r"initial model has tensor 'c'"),
        ({"a": torch.zeros(4), "b": INITIAL["b"]}, r"'a' has shape \(3,\).*\(4,\)"),
        ({"a": INITIAL["a"].double(), "b": INITIAL["b"]}, r"'a' has dtype torch.float32.*torch.float64"),
    ],
)
def test_layout_mismatch_names_the_tensor(initial: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_same_layout(CURRENT, initial)
    with pytest.raises(InvalidArgument, match=message):
        score_tensors(ScoreFunction.LARGEST_MAGNITUDE_CHANGE, CURRENT, initial)


CHANGE_FUNCTIONS = [fn for fn in ScoreFunction if fn.needs_initial_model]


@pytest.mark.parametrize("fn", CHANGE_FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_scores_written_over_the_initial_model_are_bit_for_bit_the_same(
    fn: ScoreFunction, dtype: torch.dtype
) -> None:
    # Signed zeros, equal pairs, opposite signs, and values whose difference rounds.
    w = torch.tensor([0.0, -0.0, 1.5, -1.5, 3.0, 1e-3, 7.25, -2.0], dtype=dtype)
    w0 = torch.tensor([-0.0, 0.0, 1.5, 1.5, -3.0, 1e3, 7.25, 0.0], dtype=dtype)
    expected = score_tensors(fn, {"t": w}, {"t": w0.clone()})["t"]
    scratch = w0.clone()
    got = score_tensors(fn, {"t": w}, {"t": scratch}, overwrite_initial=True)["t"]
    assert got.data_ptr() == scratch.data_ptr()  # written over the initial tensor, nothing allocated
    assert got.dtype == expected.dtype
    assert _bits(got) == _bits(expected)  # bitwise, so that -0.0 and 0.0 are told apart


def _bits(t: torch.Tensor) -> list[int]:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).tolist()


def test_overwriting_leaves_integer_tensors_and_final_magnitude_scores_alone() -> None:
    current = {"n": torch.tensor([3, -4]), "f": torch.tensor([1.0, -2.0])}
    initial = {"n": torch.tensor([1, 1]), "f": torch.tensor([0.5, 0.5])}
    kept = {name: t.clone() for name, t in initial.items()}
    scores = score_tensors(ScoreFunction.LARGEST_MAGNITUDE_CHANGE, current, initial, overwrite_initial=True)
    assert scores["n"].tolist() == [2, 5]
    assert torch.equal(initial["n"], kept["n"])  # integers are scored into a new tensor
    assert scores["f"].tolist() == [0.5, 2.5]
    assert initial["f"].data_ptr() == scores["f"].data_ptr()
    finals = score_tensors(ScoreFunction.LARGEST_FINAL_MAGNITUDE, current, kept, overwrite_initial=True)
    assert finals["f"].tolist() == [1.0, 2.0]
    assert kept["f"].tolist() == [0.5, 0.5]  # the initial model plays no part, and is not touched
