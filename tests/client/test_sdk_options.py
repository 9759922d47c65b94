"""Options beyond FL4Health, through the SDK and a real server; none changes the default."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from paramsel.client import (
    Client,
    PayloadKind,
    ScoreFunction,
    SparseCooParameterExchanger,
    SparseTensor,
    TopK,
    largest_final_magnitude_scores,
)
from paramsel.server.app import RunningServer


class Ties(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # |w| = [3, 1, 3, 3, 5]: k = ceil(5 * 0.6) = 3, threshold 3, tied three ways.
        self.w = nn.Parameter(torch.tensor([3.0, 1.0, -3.0, 3.0, 5.0]), requires_grad=False)


def test_exact_k_through_the_sdk(server: RunningServer) -> None:
    default = SparseCooParameterExchanger(0.6, largest_final_magnitude_scores, target=server.target)
    exact = SparseCooParameterExchanger(
        0.6, largest_final_magnitude_scores, target=server.target, exact_k=True
    )
    assert default.push_parameters(Ties())[0].tolist() == [3.0, -3.0, 3.0, 5.0]
    values, (indices, _, _) = exact.select_parameters(Ties())
    assert values[0].tolist() == [3.0, -3.0, 5.0]  # the first two tied entries, then 5
    assert indices[0].tolist() == [[0], [2], [4]]


def test_lossy_value_dtypes(server: RunningServer) -> None:
    criterion = TopK(1.0, ScoreFunction.LARGEST_FINAL_MAGNITUDE)
    model = {"w": torch.tensor([1.0 + 2**-10 + 2**-13, 3.0]), "n": torch.tensor([7, 9])}
    client = Client(target=server.target)
    for dtype, first in [
        (torch.float16, 1.0 + 2**-10),  # float16's step at 1 is 2**-10
        (torch.bfloat16, 1.0),  # bfloat16's is 2**-7
    ]:
        result = client.select(criterion, model, value_dtype=dtype)
        w, n = result.sparse
        assert w.values.dtype == dtype
        assert w.values.float().tolist() == [first, 3.0]
        assert n.values.dtype == torch.int64  # integer tensors are never converted
        assert n.values.tolist() == [7, 9]
    plain = client.select(criterion, model)
    assert plain.sparse[0].values.dtype == torch.float32
    np.testing.assert_array_equal(
        plain.sparse[0].values.numpy(), np.array([1.0 + 2**-10 + 2**-13, 3.0], dtype=np.float32)
    )


def test_pull_rpc_and_local_pull_agree(server: RunningServer) -> None:
    model = nn.Linear(3, 2)
    layout = {name: t.detach().clone() for name, t in model.state_dict().items()}
    exchanger = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores, target=server.target)
    payload = [np.array([4.0, 5.0]), np.array([[0, 2], [1, 1]]), np.array([2, 3]), np.array(["weight"])]
    remote = Client(target=server.target).pull(
        PayloadKind.SPARSE_COO,
        layout,
        sparse=[SparseTensor("weight", (2, 3), torch.tensor([4.0, 5.0]), torch.tensor([[0, 2], [1, 1]]))],
    )
    exchanger.pull_parameters(payload, model)
    assert torch.equal(model.weight.detach(), remote["weight"])
    assert model.weight.tolist() == [[0.0, 0.0, 4.0], [0.0, 5.0, 0.0]]


def test_local_pull_errors_are_paramsel_errors() -> None:
    import pytest

    from paramsel.client import ParamselError, StatusCode

    exchanger = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    for payload, message in [
        ([np.array([1.0]), np.array([[0, 0]]), np.array([2, 3]), np.array(["nope"])], "does not have"),
        ([np.array([1.0]), np.array([[0, 3]]), np.array([2, 3]), np.array(["weight"])], "out of range"),
        ([np.array([1.0]), np.array([[0, 0]]), np.array([3, 2]), np.array(["weight"])], "shape"),
    ]:
        with pytest.raises(ParamselError, match=message) as err:
            exchanger.pull_parameters(payload, model)
        assert err.value.status is StatusCode.INVALID_ARGUMENT
    assert torch.equal(model.weight.detach(), before)


def test_local_pull_reads_the_values_of_any_numpy_array() -> None:
    """The values are read where the packed list holds them when torch can share that memory, and
    copied first when it cannot (read-only, strided); float64 values are cast. The caller's arrays stay
    as they were."""
    exchanger = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    indices, shape, names = np.array([[0, 2], [1, 1]]), np.array([2, 3]), np.array(["weight"])
    read_only = np.array([4.0, 5.0], dtype=np.float32)
    read_only.flags.writeable = False
    arrays: list[np.ndarray] = [
        np.array([4.0, 5.0], dtype=np.float32),
        read_only,
        np.array([4.0, 9.0, 5.0], dtype=np.float32)[::2],
        np.array([4.0, 5.0], dtype=np.float64),
    ]
    for values in arrays:
        before = values.copy()
        model = nn.Linear(3, 2)
        exchanger.pull_parameters([values, indices, shape, names], model)
        assert model.weight.tolist() == [[0.0, 0.0, 4.0], [0.0, 5.0, 0.0]]
        assert model.weight.dtype == torch.float32
        np.testing.assert_array_equal(values, before)
