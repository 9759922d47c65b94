"""Applying sparse, layer and FedPM payloads to a model's declared layout."""

import math

import pytest
import torch

from paramsel.engine import (
    InvalidArgument,
    PullMode,
    SparseTensor,
    TensorSpec,
    pull_fedpm,
    pull_layers,
    pull_sparse,
)

MODEL = [TensorSpec("a", torch.float32, (2, 3)), TensorSpec("n", torch.int64, (2,))]


def sparse(name: str, shape: tuple[int, ...], values: list[float], positions: list[int]) -> SparseTensor:
    return SparseTensor(name, shape, torch.tensor(values), torch.tensor(positions, dtype=torch.int64))


def test_replace_densifies_with_zeros_elsewhere() -> None:
    pulled = pull_sparse(MODEL, [sparse("a", (2, 3), [1.5, -2.0], [1, 5])])
    assert list(pulled) == ["a"]
    assert pulled["a"].tolist() == [[0.0, 1.5, 0.0], [0.0, 0.0, -2.0]]
    assert pulled["a"].dtype == torch.float32


def test_replace_sums_duplicate_positions() -> None:
    pulled = pull_sparse(MODEL, [sparse("a", (2, 3), [1.0, 2.5, 4.0], [2, 2, 0])])
    assert pulled["a"].tolist() == [[4.0, 0.0, 3.5], [0.0, 0.0, 0.0]]


def test_replace_casts_to_the_model_dtype() -> None:
    pulled = pull_sparse(MODEL, [sparse("n", (2,), [2.75, -1.5], [0, 1])])
    assert pulled["n"].dtype == torch.int64
    assert pulled["n"].tolist() == [2, -1]  # float -> int truncates toward zero, as torch casts


def test_replace_sums_in_the_values_dtype_before_casting() -> None:
    # float16: 2048 + 1 = 2048 (the 1 is lost), and only then cast to float32.
    payload = SparseTensor(
        "a", (2, 3), torch.tensor([2048.0, 1.0], dtype=torch.float16), torch.tensor([0, 0])
    )
    assert pull_sparse(MODEL, [payload])["a"][0, 0].item() == 2048.0


def test_scatter_keeps_what_was_not_sent() -> None:
    base = {"a": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
    pulled = pull_sparse(MODEL, [sparse("a", (2, 3), [9.0, 8.0], [0, 4])], mode=PullMode.SCATTER, base=base)
    assert pulled["a"].tolist() == [[9.0, 2.0, 3.0], [4.0, 8.0, 6.0]]
    assert base["a"].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]  # the base itself is untouched


def test_scatter_sums_duplicates_and_replaces_the_old_value() -> None:
    base = {"a": torch.full((2, 3), 7.0)}
    pulled = pull_sparse(
        MODEL, [sparse("a", (2, 3), [1.0, 2.0, 3.0], [4, 1, 4])], mode=PullMode.SCATTER, base=base
    )
    assert pulled["a"].tolist() == [[7.0, 2.0, 7.0], [7.0, 4.0, 7.0]]


def test_scatter_needs_a_matching_base() -> None:
    payload = [sparse("a", (2, 3), [1.0], [0])]
    with pytest.raises(InvalidArgument, match="'a'"):
        pull_sparse(MODEL, payload, mode=PullMode.SCATTER)
    with pytest.raises(InvalidArgument, match="'a'"):
        pull_sparse(MODEL, payload, mode=PullMode.SCATTER, base={"n": torch.zeros(2)})
    with pytest.raises(InvalidArgument, match="'a'"):
        pull_sparse(MODEL, payload, mode=PullMode.SCATTER, base={"a": torch.zeros(2, 3, dtype=torch.float64)})


def test_add_adds_the_densified_payload_to_the_base() -> None:
    # Position 4 twice: 1 + 3 = 4 (summed first), added to 5; position 1: 7 + 2. Elsewhere base + 0,
    # which turns -0.0 into +0.0.
    base = {"a": torch.tensor([[1.0, 7.0, -0.0], [4.0, 5.0, 6.0]])}
    pulled = pull_sparse(
        MODEL, [sparse("a", (2, 3), [1.0, 2.0, 3.0], [4, 1, 4])], mode=PullMode.ADD, base=base
    )
    assert pulled["a"].tolist() == [[1.0, 9.0, 0.0], [4.0, 9.0, 6.0]]
    assert math.copysign(1.0, float(pulled["a"][0, 2])) == 1.0
    assert base["a"].tolist() == [[1.0, 7.0, -0.0], [4.0, 5.0, 6.0]]  # the base itself is untouched


def test_add_casts_the_sum_to_the_model_dtype_before_adding() -> None:
    # int64 model: the float sum 2.5 + 0.75 = 3.25 becomes 3, then 10 + 3.
    base = {"n": torch.tensor([10, 20])}
    pulled = pull_sparse(MODEL, [sparse("n", (2,), [2.5, 0.75], [0, 0])], mode=PullMode.ADD, base=base)
    assert (pulled["n"].dtype, pulled["n"].tolist()) == (torch.int64, [13, 20])


def test_add_needs_a_matching_base() -> None:
    payload = [sparse("a", (2, 3), [1.0], [0])]
    with pytest.raises(InvalidArgument, match="scatter or add pull needs the current value of tensor 'a'"):
        pull_sparse(MODEL, payload, mode=PullMode.ADD)


@pytest.mark.parametrize("position", [6, -1])
def test_out_of_range_position_names_tensor_and_position(position: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"'a' has position {position}\b"):
        pull_sparse(MODEL, [sparse("a", (2, 3), [1.0, 1.0], [0, position])])


def test_values_and_positions_must_pair_up() -> None:
    with pytest.raises(InvalidArgument, match="2 values but 1 positions"):
        pull_sparse(MODEL, [sparse("a", (2, 3), [1.0, 2.0], [0])])
    with pytest.raises(InvalidArgument, match="integers"):
        pull_sparse(MODEL, [SparseTensor("a", (2, 3), torch.tensor([1.0]), torch.tensor([0.0]))])


def test_unknown_duplicate_and_misshapen_payloads() -> None:
    with pytest.raises(InvalidArgument, match="payload names tensor 'x' that the model does not have"):
        pull_sparse(MODEL, [sparse("x", (1,), [1.0], [0])])
    with pytest.raises(InvalidArgument, match="'a' more than once"):
        pull_sparse(MODEL, [sparse("a", (2, 3), [1.0], [0]), sparse("a", (2, 3), [1.0], [1])])
    with pytest.raises(InvalidArgument, match=r"'a' has shape \(3, 2\).*\(2, 3\)"):
        pull_sparse(MODEL, [sparse("a", (3, 2), [1.0], [0])])
    with pytest.raises(InvalidArgument, match=r"'n' has shape \(3,\).*\(2,\)"):
        pull_layers(MODEL, [("n", torch.zeros(3))])
    with pytest.raises(InvalidArgument, match="'x'"):
        pull_fedpm(MODEL, [("x", torch.zeros(3))])


def test_pull_layers_casts_to_the_model_dtype_in_payload_order() -> None:
    pulled = pull_layers(
        MODEL, [("n", torch.tensor([3.9, -3.9])), ("a", torch.ones(2, 3, dtype=torch.float64))]
    )
    assert list(pulled) == ["n", "a"]
    assert pulled["n"].dtype == torch.int64
    assert pulled["n"].tolist() == [3, -3]
    assert pulled["a"].dtype == torch.float32


def test_pull_fedpm_applies_the_inverse_sigmoid() -> None:
    model = [TensorSpec("fc.weight_scores", torch.float32, (4,))]
    pulled = pull_fedpm(model, [("fc.weight_scores", torch.tensor([0.5, 0.25, 0.0, 1.0]))])
    got = pulled["fc.weight_scores"].tolist()
    assert got[0] == 0.0
    assert got[1] == pytest.approx(-math.log(3.0), rel=1e-6)  # -log(1 / 0.25 - 1)
    assert got[2:] == [-math.inf, math.inf]


def test_pull_fedpm_of_an_int64_mask_divides_to_float_then_casts() -> None:
    model = [TensorSpec("bias_scores", torch.float16, (2,))]
    pulled = pull_fedpm(model, [("bias_scores", torch.tensor([1, 0]))])
    assert pulled["bias_scores"].dtype == torch.float16
    assert pulled["bias_scores"].tolist() == [math.inf, -math.inf]
