"""A caller's own score function through the SDK: its scores are computed in this process and sent to
the service (``ScoreFunction.SUPPLIED``), which selects their top-k; the engine never loads here.

The model of every case: w (2 x 3) and b (2), float32 parameters, and steps, a 0-d int64 buffer.

    w = [[0.5, -1.0, 2.0],      |w| = [[0.5, 1.0, 2.0],
         [3.0,  0.0, -4.0]]            [3.0, 0.0, 4.0]]
    b = [7.0, 8.0]              |b| = [7.0, 8.0]
    steps = 5                   |steps| = 5 (int64: compared with the float32 scores as float32)

Scored by |.| at sparsity 0.5: N = 9, k = ceil(4.5) = 5; in decreasing order 8, 7, 5, 4, 3, so the
threshold is 3 and the selected entries are w[1, 0] (3.0), w[1, 2] (-4.0), b[0], b[1] and steps (0-d:
selected, never sent). FL4Health's packed list: values w [3, -4], b [7, 8]; indices w [[1, 0], [1, 2]],
b [[0], [1]]; shapes w [2, 3], b [2]; names [w, b].
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from support import StateModule
from torch import nn

import paramsel.client._client as client_module
from paramsel.client import (
    Client,
    ParamselError,
    ScoreFunction,
    SparseCooParameterExchanger,
    StatusCode,
    TopK,
    unpack_compact,
)
from paramsel.server.app import RunningServer
from paramsel.v1 import tensor_pb2
from paramsel.wire.streams import write_frames


def _model() -> StateModule:
    return StateModule(
        {
            "w": torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, -4.0]]),
            "b": torch.tensor([7.0, 8.0]),
            "steps": torch.tensor(5),
        }
    )


def magnitudes(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """A caller's own score function: |w| of every state entry (int64 for the int64 buffer)."""
    return {name: tensor.abs() for name, tensor in model.state_dict().items()}


EXPECTED = [[3.0, -4.0], [7.0, 8.0], [[1, 0], [1, 2]], [[0], [1]], [2, 3], [2], ["w", "b"]]


def _as_lists(packed: list[np.ndarray]) -> list[Any]:
    return [array.tolist() for array in packed]


def test_a_lambda_score_function_is_selected_by_the_service(server: RunningServer) -> None:
    exchanger = SparseCooParameterExchanger(
        0.5, lambda model, initial: {n: t.abs() for n, t in model.state_dict().items()}, target=server.target
    )
    assert exchanger.criterion is None  # scored here, not by one of the service's functions
    packed = exchanger.push_parameters(_model())
    assert _as_lists(packed) == EXPECTED
    assert packed[0].dtype == np.float32
    assert packed[2].dtype == np.int64
    values, (indices, shapes, names) = exchanger.select_parameters(_model())
    assert names == ["w", "b"]
    assert [v.tolist() for v in values] == EXPECTED[:2]
    assert [i.tolist() for i in indices] == EXPECTED[2:4]
    assert [s.tolist() for s in shapes] == EXPECTED[4:6]


def test_the_compact_payload_is_the_services_own(server: RunningServer) -> None:
    exchanger = SparseCooParameterExchanger(0.5, magnitudes, target=server.target)
    assert _as_lists(unpack_compact(exchanger.push_compact(_model()))) == EXPECTED
    # float16 values, encoded by the service: exact here (3, -4, 7, 8 are float16 numbers).
    half = unpack_compact(exchanger.push_compact(_model(), value_dtype=torch.float16))
    assert half[0].dtype == np.float16
    assert _as_lists(half) == EXPECTED


def test_ties_exact_k_and_attributes_are_read_at_each_call(server: RunningServer) -> None:
    # Every score 1: all 9 entries tie. FL4Health's rule sends every non-zero entry of w and b;
    # exact_k sends the first k = ceil(9 x 0.5) = 5 in state order: w[0, :], w[1, 0], w[1, 1] (0: not sent).
    exchanger = SparseCooParameterExchanger(
        0.5, lambda model, initial: {n: torch.ones_like(t) for n, t in model.state_dict().items()}
    )
    exchanger.client = Client(target=server.target)
    packed = exchanger.push_parameters(_model())
    assert packed[-1].tolist() == ["w", "b"]
    assert packed[0].tolist() == [0.5, -1.0, 2.0, 3.0, -4.0]
    exchanger.exact_k = True
    packed = exchanger.push_parameters(_model())
    assert packed[-1].tolist() == ["w"]
    assert packed[0].tolist() == [0.5, -1.0, 2.0, 3.0]
    exchanger.score_gen_function = magnitudes
    exchanger.exact_k = False
    exchanger.sparsity_level = 0.2  # k = 2: 8 and 7
    assert exchanger.push_parameters(_model())[0].tolist() == [7.0, 8.0]


def test_the_initial_model_is_passed_to_the_function_but_never_sent(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sections: list[set[int]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        sections.append({section for section, _ in kwargs.get("dense", ())})
        return write_frames(*args, **kwargs)

    monkeypatch.setattr(client_module, "write_frames", spy)
    initial = StateModule({"w": torch.zeros(2, 3), "b": torch.tensor([7.0, 0.0]), "steps": torch.tensor(5)})
    seen: list[nn.Module | None] = []

    def change(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
        # |w - w0|: b[0] and steps are unchanged (0), so k = 5 takes 8, 4, 3, 2, 1: w[0, 1], w[0, 2],
        # w[1, 0], w[1, 2] and b[1].
        seen.append(initial_model)
        assert initial_model is not None
        before = initial_model.state_dict()
        return {n: (t - before[n]).abs() for n, t in model.state_dict().items()}

    exchanger = SparseCooParameterExchanger(0.5, change, target=server.target)
    packed = exchanger.push_parameters(_model(), initial)
    assert seen == [initial]
    assert _as_lists(packed)[:2] == [[-1.0, 2.0, 3.0, -4.0], [8.0]]
    assert sections == [{tensor_pb2.SECTION_MODEL, tensor_pb2.SECTION_SCORES}]


def test_client_select_and_push_take_supplied_scores(server: RunningServer) -> None:
    client = Client(target=server.target)
    model = dict(_model().state_dict())
    scores = magnitudes(_model(), None)
    result = client.select(TopK(0.5, ScoreFunction.SUPPLIED), model, scores=scores)
    assert result.header.top_k is not None
    assert (result.header.top_k.k, result.header.top_k.threshold) == (5, 3.0)
    assert (result.header.top_k.selected_entries, result.header.top_k.sent_entries) == (5, 4)
    assert [(s.name, s.positions.tolist(), s.values.tolist()) for s in result.sparse] == [
        ("w", [3, 5], [3.0, -4.0]),
        ("b", [0, 1], [7.0, 8.0]),
    ]
    pushed = client.push(TopK(0.5, ScoreFunction.SUPPLIED), model, scores=scores)
    assert [name for name, _ in pushed.arrays] == ["w", "b"] * 3
    assert [t.tolist() for _, t in pushed.arrays] == EXPECTED[:6]


def test_the_sdk_refuses_scores_that_do_not_go_with_the_criterion(server: RunningServer) -> None:
    client = Client(target=server.target)
    model = dict(_model().state_dict())
    with pytest.raises(ParamselError, match=r"ScoreFunction\.SUPPLIED needs scores=") as refused:
        client.select(TopK(0.5, ScoreFunction.SUPPLIED), model)
    assert refused.value.status is StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match=r"scores= goes only with TopK\(\.\.\., ScoreFunction\.SUPPLIED\)"):
        client.push(
            TopK(0.5, ScoreFunction.LARGEST_FINAL_MAGNITUDE), model, scores=magnitudes(_model(), None)
        )
    with pytest.raises(ParamselError, match="the score of 'b' is a list, not a tensor") as refused:
        client.select(TopK(0.5, ScoreFunction.SUPPLIED), model, scores={"b": [1.0, 2.0]})  # type: ignore[dict-item]
    assert refused.value.status is StatusCode.INVALID_ARGUMENT
    complex_scores = {**magnitudes(_model(), None), "b": torch.ones(2, dtype=torch.complex64)}
    with pytest.raises(
        ParamselError, match=r"the score of 'b': dtype torch\.complex64 is not supported"
    ) as refused:
        client.select(TopK(0.5, ScoreFunction.SUPPLIED), model, scores=complex_scores)
    assert refused.value.status is StatusCode.INVALID_ARGUMENT


def test_only_the_scored_tensors_take_part_in_the_scores_order(server: RunningServer) -> None:
    """As in FL4Health: scores for b and w (in that order) and none for steps. N = 8, k = ceil(4) = 4; in
    decreasing order 8, 7, 4, 3, so the threshold is 3: b [7, 8] and w [3, -4], b listed first."""

    def b_then_w(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {"b": state["b"].abs(), "w": state["w"].abs()}

    exchanger = SparseCooParameterExchanger(0.5, b_then_w, target=server.target)
    expected = [[7.0, 8.0], [3.0, -4.0], [[0], [1]], [[1, 0], [1, 2]], [2], [2, 3], ["b", "w"]]
    assert _as_lists(exchanger.push_parameters(_model())) == expected
    assert _as_lists(unpack_compact(exchanger.push_compact(_model()))) == expected


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (lambda m, i: {**magnitudes(m, i), "extra": torch.zeros(1)}, "SECTION_SCORES 'extra'"),
        (lambda m, i: {**magnitudes(m, i), "b": torch.zeros(1, 2)}, "shape [1, 2] differs"),
        (lambda m, i: {**magnitudes(m, i), "b": torch.tensor([1.0, float("nan")])}, "NaN or infinite"),
        (lambda m, i: {}, "needs the caller's scores"),
    ],
    ids=["extra", "shape", "nan", "none"],
)
def test_the_service_refuses_scores_that_do_not_fit_the_model(
    server: RunningServer, scores: Any, message: str
) -> None:
    exchanger = SparseCooParameterExchanger(0.5, scores, target=server.target)
    with pytest.raises(ParamselError, match=re.escape(message)) as refused:
        exchanger.push_parameters(_model())
    assert refused.value.status is StatusCode.INVALID_ARGUMENT


@pytest.mark.slow  # starts another Python
def test_the_drop_in_path_loads_neither_the_engine_nor_the_server(server: RunningServer) -> None:
    # A fresh interpreter: the lambda's scores go to the running server; what was imported is read back.
    probe = f"""
import json, sys
import torch
from paramsel.client import SparseCooParameterExchanger

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, -4.0]]))
        self.b = torch.nn.Parameter(torch.tensor([7.0, 8.0]))
        self.register_buffer("steps", torch.tensor(5))

exchanger = SparseCooParameterExchanger(
    0.5, lambda model, initial: {{n: t.abs() for n, t in model.state_dict().items()}}, target={server.target!r}
)
packed = exchanger.push_parameters(M())
print(json.dumps({{
    "packed": [a.tolist() for a in packed],
    "loaded": {{p: any(m == p or m.startswith(p + ".") for m in sys.modules)
               for p in ("paramsel.engine", "paramsel.server")}},
}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["packed"] == EXPECTED
    assert answer["loaded"] == {"paramsel.engine": False, "paramsel.server": False}
