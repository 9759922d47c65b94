"""aggregate_sparse_coo against FL4Health's FedAvgSparseCooTensor, driven through its real aggregate_fit.

As for the layers: each client's packed list ([values..., indices..., shapes..., names]) goes through
Flower's ``ndarrays_to_parameters`` into a ``FitRes``, the aggregate comes back through
``parameters_to_ndarrays``, and ours must be the same list to the byte (values, their dtype after
torch's promotion, indices, shapes, names, order), or refused with INVALID_ARGUMENT where FL4Health
fails.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from fl4health.strategies.fedavg_sparse_coo_tensor import FedAvgSparseCooTensor
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from paramsel.client import ParamselError, StatusCode, aggregate_sparse_coo

Results = list[tuple[list[np.ndarray], int]]
Sparse = tuple[str, np.ndarray, np.ndarray, np.ndarray]
"""One tensor of a packed list: name, values, (nnz, ndim) indices, shape."""

pytestmark = pytest.mark.usefixtures("paramsel_target")


class _Proxy:
    """A stand-in for Flower's ClientProxy: the strategy never looks at it."""

    cid = "client"


@pytest.fixture(autouse=True)
def _quiet_strategy() -> Iterator[None]:
    """FL4Health logs a warning per round without a metrics function."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        logging.disable(logging.NOTSET)


def fl4health(results: Results, weighted: bool) -> list[np.ndarray]:
    strategy = FedAvgSparseCooTensor(weighted_aggregation=weighted)
    fit = [
        (
            _Proxy(),
            FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(arrays),
                num_examples=n,
                metrics={},
            ),
        )
        for arrays, n in results
    ]
    parameters, _ = strategy.aggregate_fit(1, fit, [])
    assert parameters is not None
    return parameters_to_ndarrays(parameters)


def assert_same_bits(ours: Sequence[np.ndarray], theirs: Sequence[np.ndarray]) -> None:
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"array {index}"
        if b.dtype.kind in "US":
            assert a.tolist() == b.tolist(), f"array {index}"
        else:
            assert a.tobytes() == b.tobytes(), f"array {index}: {a!r} != {b!r}"


def assert_matches(results: Results, weighted: bool) -> None:
    """Ours is FL4Health's aggregate bit for bit, or refused where FL4Health fails."""
    try:
        expected = fl4health(results, weighted)
    except Exception as error:  # whatever FL4Health raises, we must refuse
        failure: Exception | None = error
    else:
        failure = None
    if failure is not None:
        with pytest.raises(ParamselError) as refused:
            aggregate_sparse_coo(results, weighted=weighted)
        assert refused.value.status is StatusCode.INVALID_ARGUMENT, (failure, refused.value)
        return
    assert_same_bits(aggregate_sparse_coo(results, weighted=weighted), expected)


def packed(*tensors: Sparse) -> list[np.ndarray]:
    return [
        *(t[1] for t in tensors),
        *(t[2] for t in tensors),
        *(t[3] for t in tensors),
        np.array([t[0] for t in tensors]),
    ]


def coo(
    name: str, values: Sequence[float], coords: Sequence[Sequence[int]], shape: Sequence[int], dtype: str
) -> Sparse:
    indices = np.array(coords, dtype=np.int64).reshape(len(values), len(shape))
    return name, np.array(values, dtype=dtype), indices, np.array(shape, dtype=np.int64)


WEIGHTED = pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])

FLOATS = ("float16", "float32", "float64")
INTS = ("int32", "int64")
SMALL = ("int8", "int16", "uint8", "bool")


def _values(rng: np.random.Generator, dtype: str, nnz: int) -> np.ndarray:
    if dtype == "bool":
        return np.ones(nnz, dtype=bool)
    if dtype in FLOATS:
        return (rng.standard_normal(nnz) * 40).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), nnz, endpoint=True).astype(dtype)


def _random_results(seed: int, dtypes: Sequence[str], max_count: int, *, repeats: bool = False) -> Results:
    """4-6 clients, each sending a random subset of 4 names in a random order, values in a dtype drawn
    per client, at random positions (repeated and unordered ones with ``repeats``)."""
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (3, 4, 2), "conv.bias": (6,), "fc.weight": (5, 7), "bn.num_batches": (1,)}
    results: Results = []
    for _ in range(int(rng.integers(4, 7))):
        names = [name for name in shapes if rng.random() < 0.7] or ["fc.weight"]
        rng.shuffle(names)
        tensors = []
        for name in names:
            shape = shapes[name]
            numel = int(np.prod(shape))
            nnz = int(rng.integers(1, numel, endpoint=True))
            flat = rng.integers(0, numel, nnz) if repeats else np.sort(rng.choice(numel, nnz, replace=False))
            values = _values(rng, str(rng.choice(list(dtypes))), nnz)
            if values.dtype.kind == "f":
                values[values == 0] = 1  # FL4Health's clients never send zeros; keep one only where meant
            indices = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
            tensors.append((name, values, indices, np.array(shape)))
        results.append((packed(*tensors), int(rng.integers(1, max_count, endpoint=True))))
    return results


@WEIGHTED
@pytest.mark.parametrize("seed", range(6))
def test_mixed_float_dtypes_and_subsets_of_names(seed: int, weighted: bool) -> None:
    assert_matches(_random_results(seed, FLOATS, 5000), weighted)


@WEIGHTED
@pytest.mark.parametrize("seed", range(6))
def test_mixed_ints_and_floats(seed: int, weighted: bool) -> None:
    assert_matches(_random_results(100 + seed, FLOATS + INTS, 5000), weighted)


@WEIGHTED
@pytest.mark.parametrize("seed", range(4))
def test_small_integers_and_bools_wrap_as_torch_does(seed: int, weighted: bool) -> None:
    # torch wraps uint8 * 300 (numpy 2 would refuse it): FL4Health's sparse strategy computes in torch.
    assert_matches(_random_results(200 + seed, FLOATS + INTS + SMALL, 3000), weighted)


@WEIGHTED
@pytest.mark.parametrize("seed", range(3))
def test_repeated_and_unordered_indices(seed: int, weighted: bool) -> None:
    assert_matches(_random_results(300 + seed, FLOATS + INTS + SMALL, 3000, repeats=True), weighted)


@WEIGHTED
def test_special_values(weighted: bool) -> None:
    nan, inf = np.nan, np.inf
    a = coo("w", [nan, -0.0, inf, 1.0, 60000, 1e-45], [[0], [1], [2], [3], [4], [5]], [7], "float32")
    b = coo("w", [1.0, -0.0, -inf, nan, 60000, -1e-45], [[0], [1], [2], [3], [4], [5]], [7], "float32")
    h = coo("h", [100.0, -0.0, 60000, 6e-8], [[0], [1], [2], [3]], [4], "float16")
    # -0.0 is dropped, NaN kept, inf - inf is NaN, float16 * 1000 overflows, 1e-45 / n underflows.
    assert_matches([(packed(a, h), 1000), (packed(b), 3)], weighted)


@WEIGHTED
def test_an_average_that_is_all_zeros_keeps_its_name(weighted: bool) -> None:
    a = coo("w", [2.0, 5.0], [[0, 1], [1, 1]], [2, 2], "float32")
    b = coo("w", [-2.0, -5.0], [[0, 1], [1, 1]], [2, 2], "float32")
    c = coo("v", [1.5], [[2]], [3], "float64")
    assert_matches([(packed(a, c), 1), (packed(b), 1)], weighted)


@WEIGHTED
@pytest.mark.parametrize(
    ("first", "second"),
    [((3,), (1,)), ((2, 1), (3,)), ((), (2, 2)), ((3,), (4,)), ((2, 3), (3, 2)), ((), ())],
    ids=["3+1", "2x1+3", "0d+2x2", "3+4-refused", "2x3+3x2-refused", "0d-refused"],
)
def test_shapes_that_differ_broadcast_or_are_refused(
    first: tuple[int, ...], second: tuple[int, ...], weighted: bool
) -> None:
    # torch.add broadcasts the densified tensors; a 0-d aggregate cannot be re-sparsified by FL4Health.
    def full(shape: tuple[int, ...], dtype: str, scale: float) -> Sparse:
        numel = int(np.prod(shape))
        flat = np.arange(numel)
        coords = np.stack(np.unravel_index(flat, shape), axis=1) if shape else np.zeros((numel, 0), np.int64)
        return (
            "w",
            (np.arange(1, numel + 1) * scale).astype(dtype),
            coords.astype(np.int64),
            np.array(shape, np.int64),
        )

    assert_matches(
        [(packed(full(first, "float64", 1.5)), 2), (packed(full(second, "float32", 0.25)), 3)], weighted
    )


@WEIGHTED
def test_a_name_sent_twice_by_one_client_counts_twice(weighted: bool) -> None:
    a = packed(
        coo("w", [1.0, 2.0], [[0], [2]], [3], "float32"),
        coo("b", [5.0], [[0]], [1], "float64"),
        coo("w", [3.0], [[2]], [3], "float16"),
    )
    b = packed(coo("b", [1.5], [[0]], [1], "float32"), coo("w", [7.0], [[1]], [3], "float32"))
    assert_matches([(a, 3), (b, 2)], weighted)


@WEIGHTED
def test_sent_with_no_entries(weighted: bool) -> None:
    # Integer values with no entries still count as zeros; float ones make FL4Health's pseudo-sort fail.
    a = packed(coo("w", [6.0], [[1]], [2], "float32"))
    ints = packed(("w", np.zeros(0, np.int64), np.zeros((0, 1), np.int64), np.array([2])))
    floats = packed(("w", np.zeros(0, np.float32), np.zeros((0, 1), np.int64), np.array([2])))
    assert_matches([(a, 1), (ints, 2)], weighted)
    assert_matches([(a, 1), (floats, 2)], weighted)


@WEIGHTED
@pytest.mark.parametrize(
    "bad",
    [
        [np.array([], dtype=np.str_)],  # no tensors: FL4Health asserts there is at least one
        [np.array([])],  # the same, with a float64 names array: its pseudo-sort fails first
        packed(("w", np.array([1.0], np.float32), np.array([[1]]), np.array([3.0]))),  # a float shape
        packed(("w", np.array([1.0], np.float32), np.array([[1]]), np.array(3))),  # a 0-d shape
        packed(("w", np.array([1.5], ">f4"), np.array([[1]]), np.array([3]))),  # torch.tensor refuses it
        packed(
            ("w", np.array([[1.0], [2.0]], np.float32), np.array([[1], [2]]), np.array([3]))
        ),  # 2-D values
        packed(("w", np.array([1.0, 2.0], np.float32), np.array([0, 1]), np.array([3]))),  # 1-D indices
        packed(("w", np.array([1.0], np.float32), np.array([[1, 0]]), np.array([3]))),  # 2 coordinates of 1
        [
            *packed(("w", np.array([1.0], np.float32), np.array([[1]]), np.array([3])))[:-1],
            np.array(["w", "v"]),
        ],
    ],
    ids=[
        "no-tensors",
        "float-names",
        "float-shape",
        "0d-shape",
        "big-endian-values",
        "2d-values",
        "1d-indices",
        "indices-of-another-rank",
        "more-names-than-tensors",
    ],
)
def test_what_fl4health_fails_on_is_refused(bad: list[np.ndarray], weighted: bool) -> None:
    assert_matches([(packed(coo("w", [1.0, 3.0], [[0], [2]], [3], "float32")), 2), (bad, 5)], weighted)


@WEIGHTED
def test_a_0d_values_array_and_float_indices(weighted: bool) -> None:
    # FL4Health takes both (torch reads the one value, and casts the coordinates to int64).
    a = packed(("w", np.array(1.5, np.float32), np.array([[1]]), np.array([3])))
    b = packed(("w", np.array([2.0, 4.0], np.float32), np.array([[0.0], [1.0]]), np.array([3])))
    assert_matches([(a, 2), (b, 3)], weighted)


@WEIGHTED
def test_indices_of_other_integer_dtypes(weighted: bool) -> None:
    a = packed(
        ("w", np.array([1.0, 2.0], np.float32), np.array([[0, 1], [1, 0]], np.int32), np.array([2, 2]))
    )
    b = packed(("w", np.array([4.0], np.float32), np.array([[1, 1]], np.uint8), np.array([2, 2], np.int32)))
    assert_matches([(a, 2), (b, 3)], weighted)


@WEIGHTED
def test_order_of_arrival_does_not_matter(weighted: bool) -> None:
    results = _random_results(7, FLOATS, 3000)
    expected = fl4health(results, weighted)
    shuffled = list(results)
    for seed in range(3):
        random.Random(seed).shuffle(shuffled)
        assert_same_bits(aggregate_sparse_coo(shuffled, weighted=weighted), expected)
