"""Options beyond FL4Health, through the SDK and a real server; none changes the default."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from paramsel.client import Client, SparseCooParameterExchanger, largest_final_magnitude_scores
from paramsel.server.app import RunningServer
from paramsel.v1 import criteria_pb2, tensor_pb2


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
    criterion = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=1.0, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    model = {"w": torch.tensor([1.0 + 2**-10 + 2**-13, 3.0]), "n": torch.tensor([7, 9])}
    client = Client(target=server.target)
    for wire, dtype, first in [
        (tensor_pb2.DATA_TYPE_FLOAT16, torch.float16, 1.0 + 2**-10),  # float16's step at 1 is 2**-10
        (tensor_pb2.DATA_TYPE_BFLOAT16, torch.bfloat16, 1.0),  # bfloat16's is 2**-7
    ]:
        result = client.select(criterion, model, value_dtype=wire)
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
