"""The SDK's default, the service run in this process (no target), against a real server on port 0:
every call gives the same results, bit for bit, and the same errors (status, message, reason).

Each case is a function of a :class:`Client`; it runs once with no target (in process) and once with
the server's address (gRPC), and what it returns (or raises) is compared whole. ``embedded-grpc`` is
checked to go through a loopback server, and to agree too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from paramsel.client import (
    Averaging,
    Client,
    DriftPercentage,
    DriftThreshold,
    FedPm,
    ParamselError,
    PayloadKind,
    PositionEncoding,
    PullMode,
    ScoreFunction,
    SparseTensor,
    SparseUpdate,
    TopK,
    UpdateSelection,
)
from paramsel.client._connection import in_process
from paramsel.client._target import EMBEDDED_GRPC, ENV_TARGET
from paramsel.server.app import RunningServer
from paramsel.wire.fastframes import ChunkFrame

Case = Callable[[Client], Any]


@pytest.fixture(autouse=True)
def _no_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TARGET, raising=False)


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 12, generator=g),
        "fc.bias": torch.randn(10, generator=g),
        "scale": torch.randn((), generator=g),
        "half": torch.randn(7, 5, generator=g).to(torch.float16),
    }


def _initial(model: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
        for k, v in model.items()
    }


MODEL = _model()
INITIAL = _initial(MODEL)
SCORES = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in MODEL.items()}
FEDPM = {
    "layer.weight_scores": torch.randn(6, 8, generator=torch.Generator().manual_seed(2)),
    "layer.bias_scores": torch.randn(6, generator=torch.Generator().manual_seed(3)),
    "other": torch.randn(3),
}


def _topk(function: ScoreFunction) -> Case:
    return lambda c: c.select(TopK(0.3, function), MODEL, INITIAL)


def _encoded(encoding: PositionEncoding) -> Case:
    criterion = TopK(0.3, ScoreFunction.LARGEST_MAGNITUDE_CHANGE)
    return lambda c: c.select(criterion, MODEL, INITIAL, position_encoding=encoding)


SELECT_CASES: dict[str, Case] = {
    **{f"topk-{f.name.lower()}": _topk(f) for f in ScoreFunction if f is not ScoreFunction.SUPPLIED},
    "topk-exact-k": lambda c: c.select(
        TopK(0.25, ScoreFunction.LARGEST_FINAL_MAGNITUDE, exact_k=True), MODEL
    ),
    "topk-no-initial-reuse": lambda c: c.select(
        TopK(0.3, ScoreFunction.SMALLEST_MAGNITUDE_CHANGE), MODEL, INITIAL, reuse_initial=False
    ),
    "supplied": lambda c: c.select(TopK(0.2, ScoreFunction.SUPPLIED), MODEL, scores=SCORES),
    "drift-threshold": lambda c: c.select(DriftThreshold(0.5), MODEL, INITIAL),
    "drift-percentage": lambda c: c.select(DriftPercentage(0.4, normalize=False), MODEL, INITIAL),
    "fedpm": lambda c: c.select(FedPm(seed=11), FEDPM),
    "fedpm-packed": lambda c: c.select(FedPm(seed=11, packed_masks=True), FEDPM),
    "update-topk": lambda c: c.select(
        SparseUpdate(0.2), MODEL, INITIAL, residual={"fc.weight": torch.full((10, 12), 0.01)}
    ),
    "update-random-k": lambda c: c.select(
        SparseUpdate(0.2, UpdateSelection.RANDOM_K, seed=7), MODEL, INITIAL
    ),
    "update-random-k-seeded": lambda c: c.select(
        SparseUpdate(0.2, UpdateSelection.RANDOM_K, seed=7),
        MODEL,
        INITIAL,
        position_encoding=PositionEncoding.SEEDED,
    ),
    "update-random-k-coo": lambda c: c.select(
        SparseUpdate(0.2, UpdateSelection.RANDOM_K, seed=7),
        MODEL,
        INITIAL,
        position_encoding=PositionEncoding.COO_INT64,
    ),
    **{
        f"encoding-{e.name.lower()}": _encoded(e)
        for e in (
            PositionEncoding.COO_INT64,
            PositionEncoding.FLAT_INT64,
            PositionEncoding.BITMAP,
            PositionEncoding.ELIAS_FANO,
        )
    },
    "fp16-values": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL, value_dtype=torch.float16
    ),
    "bf16-layers": lambda c: c.select(DriftPercentage(0.5), MODEL, INITIAL, value_dtype=torch.bfloat16),
    "keep-frames": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL, keep_frames=True
    ),
    "keep-frames-seeded": lambda c: c.select(
        SparseUpdate(0.1, UpdateSelection.RANDOM_K, seed=3), MODEL, INITIAL, keep_frames=True
    ),
    "keep-frames-layers": lambda c: c.select(DriftThreshold(0.1), MODEL, INITIAL, keep_frames=True),
    "grad-and-view": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE),
        {"t": SCORES["fc.weight"][:6, :4].t().requires_grad_(), "s": torch.arange(20.0)[::2]},
    ),
    "int": lambda c: c.select(
        DriftPercentage(1.0, normalize=False),
        {"i": torch.arange(6).reshape(2, 3), "f": torch.ones(2)},
        {"i": torch.zeros(2, 3, dtype=torch.int64), "f": torch.zeros(2)},
    ),
    "fedpm-no-scores": lambda c: c.select(FedPm(seed=1), {"w": torch.ones(2)}),
}

PUSH_CASES: dict[str, Case] = {
    "topk": lambda c: c.push(TopK(0.3, ScoreFunction.LARGEST_MAGNITUDE_CHANGE), MODEL, INITIAL),
    "topk-fp16": lambda c: c.push(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL, value_dtype=torch.float16
    ),
    "supplied": lambda c: c.push(TopK(0.2, ScoreFunction.SUPPLIED), MODEL, scores=SCORES),
    "drift": lambda c: c.push(DriftThreshold(0.2), MODEL, INITIAL),
    "fedpm": lambda c: c.push(FedPm(seed=5), FEDPM),
    "fedpm-packed": lambda c: c.push(FedPm(seed=5, packed_masks=True), FEDPM),
    "update": lambda c: c.push(SparseUpdate(0.3, UpdateSelection.RANDOM_K, seed=1), MODEL, INITIAL),
}


def _sparse(name: str, shape: tuple[int, ...], positions: list[int], seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    return SparseTensor(name, shape, torch.randn(len(positions), generator=g), torch.tensor(positions))


PROBABILITIES = torch.rand(5, generator=torch.Generator().manual_seed(8))
LAYOUT = {"w": torch.zeros(3, 4), "b": torch.zeros(4), "h": torch.zeros(2, 2, dtype=torch.float16)}
BASE = [("w", torch.arange(12.0).reshape(3, 4)), ("b", torch.ones(4))]


def _pulled(mode: PullMode) -> Case:
    sparse = [_sparse("w", (3, 4), [0, 5, 11]), _sparse("b", (4,), [3, 1, 3], 1)]
    base = BASE if mode is not PullMode.REPLACE else ()
    return lambda c: c.pull(PayloadKind.SPARSE_COO, LAYOUT, sparse=sparse, mode=mode, base=base)


PULL_CASES: dict[str, Case] = {
    **{f"sparse-{m.name.lower()}": _pulled(m) for m in (PullMode.REPLACE, PullMode.SCATTER, PullMode.ADD)},
    "sparse-coo-2d": lambda c: c.pull(
        PayloadKind.SPARSE_COO,
        LAYOUT,
        sparse=[SparseTensor("w", (3, 4), torch.tensor([1.0, 2.0]), torch.tensor([[0, 1], [2, 3]]))],
    ),
    "sparse-to-fp16": lambda c: c.pull(PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("h", (2, 2), [1, 2])]),
    "sparse-seeded": lambda c: c.pull(
        PayloadKind.SPARSE_COO,
        {"w": torch.zeros(50)},
        sparse=[
            SparseTensor(
                "w",
                (50,),
                torch.arange(5.0),
                torch.from_numpy(
                    __import__("paramsel.wire.seeded", fromlist=["x"]).seeded_positions(9, 50, 5)
                ),
                9,
            )
        ],
    ),
    "layers": lambda c: c.pull(
        PayloadKind.LAYERS, LAYOUT, tensors=[("b", torch.arange(4.0)), ("h", torch.ones(2, 2))]
    ),
    "layers-same-dtype": lambda c: c.pull(PayloadKind.LAYERS, LAYOUT, tensors=[("b", torch.arange(4.0))]),
    "fedpm": lambda c: c.pull(
        PayloadKind.FEDPM_PROBABILITIES,
        {"x.weight_scores": torch.zeros(5)},
        tensors=[("x.weight_scores", PROBABILITIES)],
    ),
}


def _contribution(n: int, seed: int, positions: list[int]) -> tuple[int, list[Any], list[SparseTensor]]:
    return n, [], [_sparse("w", (3, 4), positions, seed), _sparse("b", (4,), [0, 2], seed + 1)]


def _seeded_contribution(n: int, seed: int) -> tuple[int, list[Any], list[SparseTensor]]:
    from paramsel.wire.seeded import seeded_positions

    positions = torch.from_numpy(seeded_positions(4, 30, 6))
    values = torch.randn(6, generator=torch.Generator().manual_seed(seed))
    return n, [], [SparseTensor("u", (30,), values, positions, 4)]


AGGREGATE_CASES: dict[str, Case] = {
    "sparse-per-tensor": lambda c: c.aggregate(
        PayloadKind.SPARSE_COO, [_contribution(3, 0, [0, 4, 7]), _contribution(1, 2, [4, 8])]
    ),
    "sparse-unweighted": lambda c: c.aggregate(
        PayloadKind.SPARSE_COO, [_contribution(3, 0, [0, 4, 7]), _contribution(1, 2, [4, 8])], weighted=False
    ),
    "sparse-per-coordinate": lambda c: c.aggregate(
        PayloadKind.SPARSE_COO,
        [_contribution(3, 0, [0, 4, 7]), _contribution(1, 2, [4, 8])],
        averaging=Averaging.PER_COORDINATE,
    ),
    "per-coordinate-seeded": lambda c: c.aggregate(
        PayloadKind.SPARSE_COO,
        [_seeded_contribution(2, 0), _seeded_contribution(5, 1)],
        averaging=Averaging.PER_COORDINATE,
        keep_frames=True,
    ),
    "per-coordinate-fp16": lambda c: c.aggregate(
        PayloadKind.SPARSE_COO,
        [_contribution(3, 0, [0, 4, 7]), _contribution(1, 2, [4, 8])],
        averaging=Averaging.PER_COORDINATE,
        value_dtype=torch.float16,
    ),
    "layers": lambda c: c.aggregate(
        PayloadKind.LAYERS,
        [
            (2, [("w", torch.ones(3)), ("i", torch.arange(3))], []),
            (3, [("w", torch.zeros(3)), ("i", torch.ones(3, dtype=torch.int64))], []),
        ],
    ),
    "layers-one": lambda c: c.aggregate(
        PayloadKind.LAYERS, [(2, [("w", torch.ones(3))], [])], keep_frames=True
    ),
    "layers-bf16": lambda c: c.aggregate(
        PayloadKind.LAYERS,
        [(2, [("w", SCORES["fc.bias"][:3])], []), (1, [("w", SCORES["fc.bias"][3:6])], [])],
        value_dtype=torch.bfloat16,
    ),
}

BAD_CASES: dict[str, Case] = {
    "empty-name": lambda c: c.select(TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), {"": torch.ones(3)}),
    "long-name": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), {"x" * 5000: torch.ones(3)}
    ),
    "complex-dtype": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), {"z": torch.ones(3, dtype=torch.complex64)}
    ),
    "sparse-layout": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), {"s": torch.ones(3).to_sparse()}
    ),
    "complex-initial": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_MAGNITUDE_CHANGE),
        MODEL,
        {**INITIAL, "fc.bias": INITIAL["fc.bias"].to(torch.complex64)},
    ),
    "sparse-initial": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_MAGNITUDE_CHANGE),
        MODEL,
        {**INITIAL, "fc.bias": INITIAL["fc.bias"].to_sparse()},
    ),
    "not-a-tensor": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE),
        {"a": [1.0]},  # type: ignore[dict-item]
    ),
    "empty-model": lambda c: c.select(TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), {}),
    "sparsity-out-of-range": lambda c: c.select(TopK(1.5, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL),
    "change-without-initial": lambda c: c.select(TopK(0.3, ScoreFunction.LARGEST_MAGNITUDE_CHANGE), MODEL),
    "initial-mismatch": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_MAGNITUDE_CHANGE), MODEL, {**INITIAL, "fc.bias": torch.ones(3)}
    ),
    "drift-without-initial": lambda c: c.select(DriftThreshold(0.5), MODEL),
    "scores-wrong-shape": lambda c: c.select(
        TopK(0.2, ScoreFunction.SUPPLIED), MODEL, scores={**SCORES, "fc.bias": torch.ones(3)}
    ),
    "scores-missing": lambda c: c.select(
        TopK(0.2, ScoreFunction.SUPPLIED), MODEL, scores={"fc.bias": SCORES["fc.bias"]}
    ),
    "scores-extra": lambda c: c.push(
        TopK(0.2, ScoreFunction.SUPPLIED), MODEL, scores={**SCORES, "x": torch.ones(1)}
    ),
    "residual-wrong-shape": lambda c: c.select(
        SparseUpdate(0.2), MODEL, INITIAL, residual={"fc.bias": torch.ones(3)}
    ),
    "residual-unknown": lambda c: c.select(
        SparseUpdate(0.2), MODEL, INITIAL, residual={"nope": torch.ones(3)}
    ),
    "update-without-initial": lambda c: c.select(SparseUpdate(0.2), MODEL),
    "update-bool": lambda c: c.select(
        SparseUpdate(0.2), {"b": torch.ones(3, dtype=torch.bool)}, {"b": torch.ones(3, dtype=torch.bool)}
    ),
    "seeded-topk": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL, position_encoding=PositionEncoding.SEEDED
    ),
    "value-dtype-fp32": lambda c: c.select(
        TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL, value_dtype=torch.float32
    ),
    "push-value-dtype-fp64": lambda c: c.push(DriftThreshold(0.0), MODEL, INITIAL, value_dtype=torch.float64),
    "bool-drift": lambda c: c.select(
        DriftPercentage(1.0), {"b": torch.tensor([True, False])}, {"b": torch.tensor([False, False])}
    ),
    "pull-out-of-range": lambda c: c.pull(
        PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("w", (3, 4), [0, 12])]
    ),
    "pull-negative": lambda c: c.pull(PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("w", (3, 4), [-1])]),
    "pull-coo-out-of-range": lambda c: c.pull(
        PayloadKind.SPARSE_COO,
        LAYOUT,
        sparse=[SparseTensor("w", (3, 4), torch.ones(1), torch.tensor([[3, 0]]))],
    ),
    "pull-shape-mismatch": lambda c: c.pull(
        PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("w", (4, 3), [0])]
    ),
    "pull-unknown-name": lambda c: c.pull(PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("q", (3, 4), [0])]),
    "pull-scatter-no-base": lambda c: c.pull(
        PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("w", (3, 4), [0])], mode=PullMode.SCATTER
    ),
    "pull-base-wrong": lambda c: c.pull(
        PayloadKind.SPARSE_COO,
        LAYOUT,
        sparse=[_sparse("w", (3, 4), [0])],
        mode=PullMode.ADD,
        base=[("w", torch.ones(2))],
    ),
    "pull-base-in-replace": lambda c: c.pull(
        PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("w", (3, 4), [0])], base=BASE
    ),
    "pull-layers-scatter": lambda c: c.pull(
        PayloadKind.LAYERS, LAYOUT, tensors=[("b", torch.ones(4))], mode=PullMode.SCATTER
    ),
    "pull-layers-wrong-shape": lambda c: c.pull(PayloadKind.LAYERS, LAYOUT, tensors=[("b", torch.ones(5))]),
    "pull-duplicate-name": lambda c: c.pull(
        PayloadKind.LAYERS, LAYOUT, tensors=[("b", torch.ones(4)), ("b", torch.ones(4))]
    ),
    "pull-no-layout": lambda c: c.pull(PayloadKind.LAYERS, {}, tensors=[("b", torch.ones(4))]),
    "pull-both-payloads": lambda c: c.pull(
        PayloadKind.SPARSE_COO, LAYOUT, sparse=[_sparse("w", (3, 4), [0])], tensors=[("b", torch.ones(4))]
    ),
    "pull-seeded-mismatch": lambda c: c.pull(
        PayloadKind.SPARSE_COO,
        {"w": torch.zeros(5)},
        sparse=[SparseTensor("w", (5,), torch.ones(9), torch.arange(9), 3)],
    ),
    "aggregate-zero-examples": lambda c: c.aggregate(PayloadKind.SPARSE_COO, [_contribution(0, 0, [1])]),
    "aggregate-none": lambda c: c.aggregate(PayloadKind.SPARSE_COO, []),
    "aggregate-per-coordinate-layers": lambda c: c.aggregate(
        PayloadKind.LAYERS, [(1, [("w", torch.ones(2))], [])], averaging=Averaging.PER_COORDINATE
    ),
    "aggregate-mixed-shapes": lambda c: c.aggregate(
        PayloadKind.LAYERS, [(1, [("w", torch.ones(2))], []), (1, [("w", torch.ones(3))], [])]
    ),
    "aggregate-sparse-as-layers": lambda c: c.aggregate(PayloadKind.LAYERS, [_contribution(1, 0, [1])]),
    "aggregate-out-of-range": lambda c: c.aggregate(PayloadKind.SPARSE_COO, [_contribution(1, 0, [99])]),
}


def _outcome(case: Case, client: Client) -> Any:
    try:
        return ("ok", case(client))
    except ParamselError as error:
        return ("error", type(error).__name__, error.status, error.message, error.reason)
    except Exception as error:  # what the SDK raises is part of what is compared
        return ("raised", type(error).__name__, str(error))


def _canonical(value: Any) -> Any:
    """A value that compares equal exactly when two results are the same bit for bit."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
        return ("tensor", t.dtype, tuple(t.shape), t.requires_grad, t.is_contiguous(), bytes(raw.numpy()))
    if isinstance(value, ChunkFrame):
        return ("frame", value.encoded)
    if hasattr(value, "SerializeToString"):
        return ("frame", type(value).__name__, value.SerializeToString(deterministic=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__name__,
            *(_canonical(getattr(value, f.name)) for f in dataclasses.fields(value)),
        )
    if isinstance(value, dict):
        return ("dict", tuple((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    return value


def _both(server: RunningServer, case: Case) -> tuple[Any, Any]:
    local = Client()
    assert in_process(local.connection)
    return _canonical(_outcome(case, local)), _canonical(_outcome(case, Client(target=server.target)))


ALL = {
    **{f"select-{k}": v for k, v in SELECT_CASES.items()},
    **{f"push-{k}": v for k, v in PUSH_CASES.items()},
    **{f"pull-{k}": v for k, v in PULL_CASES.items()},
    **{f"aggregate-{k}": v for k, v in AGGREGATE_CASES.items()},
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_same_results(server: RunningServer, name: str) -> None:
    local, remote = _both(server, ALL[name])
    assert remote[1][0] == "ok", remote
    assert local == remote


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_same_errors(server: RunningServer, name: str) -> None:
    local, remote = _both(server, BAD_CASES[name])
    assert remote[1][0] != "ok", remote
    assert local == remote


def test_server_info_is_the_embedded_servers(server: RunningServer) -> None:
    local, remote = _both(server, lambda c: c.server_info())
    assert local == remote


def test_results_do_not_share_the_callers_memory() -> None:
    model = {"w": torch.arange(6.0), "b": torch.ones(2)}
    result = Client().select(
        DriftPercentage(1.0, normalize=False), model, {k: torch.zeros_like(v) for k, v in model.items()}
    )
    pulled = Client().pull(PayloadKind.LAYERS, {"w": torch.zeros(6)}, tensors=[("w", model["w"])])
    model["w"].add_(100)
    assert all(t.max() < 100 for _, t in result.tensors)
    assert pulled["w"].max() < 100


def test_inputs_are_left_as_they_were() -> None:
    model = _model(3)
    initial = _initial(model, 4)
    before = _canonical((model, initial))
    for criterion in (
        TopK(0.3, ScoreFunction.LARGEST_MAGNITUDE_CHANGE),
        TopK(0.3, ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE),
        SparseUpdate(0.3),
    ):
        Client().select(criterion, model, initial, reuse_initial=False)
        Client().push(criterion, model, initial, reuse_initial=False)
    assert _canonical((model, initial)) == before


def test_embedded_grpc_goes_through_a_loopback_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from paramsel.client import _embedded

    monkeypatch.setattr(_embedded, "run_local", _refuse)
    client = Client(target=EMBEDDED_GRPC)
    assert not in_process(client.connection)
    remote = client.select(TopK(0.3, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL)
    assert remote.header.top_k is not None
    monkeypatch.setenv(ENV_TARGET, EMBEDDED_GRPC)
    assert not in_process(Client().connection)
    assert Client().server_info().api_package == "paramsel.v1"
    monkeypatch.undo()
    assert in_process(Client().connection) == (not os.environ.get(ENV_TARGET))


def test_embedded_grpc_agrees_with_in_process() -> None:
    for case in (SELECT_CASES["update-random-k"], PULL_CASES["sparse-add"], BAD_CASES["pull-out-of-range"]):
        assert _canonical(_outcome(case, Client())) == _canonical(
            _outcome(case, Client(target=EMBEDDED_GRPC))
        )


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("embedded-grpc must not run the service in process")
