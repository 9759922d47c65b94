"""aggregate_layers against FL4Health's FedAvgDynamicLayer, driven through its real aggregate_fit.

The oracle is the strategy itself: each client's packed list goes through Flower's
``ndarrays_to_parameters`` into a ``FitRes``, and the aggregate comes back through
``parameters_to_ndarrays``. Ours must be the same list: names, order, dtypes, shapes and bytes (NaN,
inf and -0.0 included). Where FL4Health fails, ours must refuse with INVALID_ARGUMENT. numpy 1 and
numpy 2 promote differently; both sides run on this interpreter's numpy, so the expectation is
always FL4Health's in this environment.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
from fl4health.strategies.fedavg_dynamic_layer import FedAvgDynamicLayer
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from paramsel.client import ParamselError, StatusCode, aggregate_layers

Results = list[tuple[list[np.ndarray], int]]

pytestmark = pytest.mark.usefixtures("paramsel_target")


class _Proxy:
    """A stand-in for Flower's ClientProxy: the strategy never looks at it."""

    cid = "client"


@pytest.fixture(autouse=True)
def _quiet_strategy() -> Iterator[None]:
    """FL4Health logs a warning per round without a metrics function; numpy warns on float16 overflow."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        logging.disable(logging.NOTSET)


def fl4health(results: Results, weighted: bool) -> list[np.ndarray]:
    strategy = FedAvgDynamicLayer(weighted_aggregation=weighted)
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


def assert_matches(
    results: Results, weighted: bool, ours: Callable[..., list[np.ndarray]] = aggregate_layers
) -> None:
    """Ours is FL4Health's aggregate bit for bit, or refused where FL4Health fails."""
    try:
        expected = fl4health(results, weighted)
    except Exception as error:  # whatever FL4Health raises, we must refuse
        failure: Exception | None = error
    else:
        failure = None
    if failure is not None:
        with pytest.raises(ParamselError) as refused:
            ours(results, weighted=weighted)
        assert refused.value.status is StatusCode.INVALID_ARGUMENT, (failure, refused.value)
        return
    assert_same_bits(ours(results, weighted=weighted), expected)


def packed(*layers: tuple[str, np.ndarray]) -> list[np.ndarray]:
    return [array for _, array in layers] + [np.array([name for name, _ in layers])]


WEIGHTED = pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])

FLOATS = ("float16", "float32", "float64")
INTS = ("int32", "int64")
SMALL = ("int8", "int16", "uint8", "bool")


def _array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in FLOATS:
        return (rng.standard_normal(shape) * 40).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dtype)


def _random_results(seed: int, dtypes: Sequence[str], max_count: int) -> Results:
    """4-6 clients, each sending a random subset of 5 names in a random order, each name in a dtype
    drawn per client: mixed dtypes across clients, and 0-d, 1-d and 2-d layers."""
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (3, 4), "conv.bias": (4,), "bn.running_mean": (4,), "scale": (), "fc": (2, 5)}
    results: Results = []
    for _ in range(int(rng.integers(4, 7))):
        names = [name for name in shapes if rng.random() < 0.7] or ["fc"]
        rng.shuffle(names)
        layers = [(name, _array(rng, str(rng.choice(list(dtypes))), shapes[name])) for name in names]
        results.append((packed(*layers), int(rng.integers(1, max_count, endpoint=True))))
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
def test_small_integer_and_bool_layers(seed: int, weighted: bool) -> None:
    # Counts up to 100 fit int8 and uint8: numpy 2 multiplies without complaint.
    assert_matches(_random_results(200 + seed, FLOATS + INTS + SMALL, 100), weighted)


@WEIGHTED
@pytest.mark.parametrize(
    ("dtype", "count"),
    [("uint8", 300), ("int8", 128), ("int16", 40000), ("uint8", 255), ("float16", 300), ("bool", 70000)],
)
def test_counts_beyond_a_small_dtype(dtype: str, count: int, weighted: bool) -> None:
    # numpy 2 (NEP 50) refuses uint8 * 300, numpy 1 widens to uint16; float16 * 300 stays float16 in
    # numpy 2 but widens to float32 in numpy 1. Whichever numpy this is, FL4Health's outcome is ours.
    layer = np.array([3, 1, 0], dtype=dtype)
    assert_matches([(packed(("w", layer)), count), (packed(("w", layer[::-1].copy())), 2)], weighted)


@WEIGHTED
def test_zero_dimensional_layers_mix_with_dimensioned_ones(weighted: bool) -> None:
    # numpy 1 treats a 0-d array as a scalar when promoting (float64 0-d + float32 1-d is float32),
    # numpy 2 does not: this is where the two numpys part ways most.
    results = [
        (packed(("w", np.array(1.1, np.float64)), ("s", np.array(2.5, np.float32))), 3),
        (packed(("w", np.array([1.5, 2.5], np.float32)), ("s", np.array(7, np.int64))), 4),
        (packed(("s", np.array(0.3, np.float16))), 300),
    ]
    assert_matches(results, weighted)


@WEIGHTED
def test_special_values(weighted: bool) -> None:
    nan, inf = np.nan, np.inf
    results = [
        (packed(("w", np.array([nan, -0.0, inf, 1.0, -0.0, 60000], np.float32))), 2),
        (packed(("w", np.array([1.0, -0.0, -inf, nan, 0.0, 60000], np.float32))), 5),
        (packed(("h", np.array([-0.0, 60000, 1e-7], np.float16))), 7),
    ]
    assert_matches(results, weighted)


@WEIGHTED
@pytest.mark.parametrize(
    "shapes",
    [((3,), (1,)), ((2, 1), (3,)), ((), (2, 2)), ((1, 4), (3, 1), (4,)), ((3,), (4,)), ((2, 3), (3, 2))],
    ids=["3+1", "2x1+3", "0d+2x2", "three", "3+4-refused", "2x3+3x2-refused"],
)
def test_shapes_that_differ_broadcast_or_are_refused(
    shapes: tuple[tuple[int, ...], ...], weighted: bool
) -> None:
    rng = np.random.default_rng(len(shapes))
    results = [
        (packed(("w", (rng.standard_normal(shape) * 3).astype(np.float32))), n)
        for n, shape in enumerate(shapes, start=2)
    ]
    assert_matches(results, weighted)


@WEIGHTED
def test_a_name_sent_twice_by_one_client_counts_twice(weighted: bool) -> None:
    results = [
        (
            packed(
                ("w", np.array([1.0, 2.0], np.float32)), ("b", np.array([5.0])), ("w", np.array([3.0, 5.0]))
            ),
            3,
        ),
        (packed(("b", np.array([1.5], np.float16)), ("w", np.array([7.0, 9.0], np.float32))), 2),
        (
            packed(
                ("w", np.array([0.5, 0.25], np.float16)), ("w", np.array([1, 2])), ("w", np.array([4.0, 4.0]))
            ),
            1,
        ),
    ]
    assert_matches(results, weighted)


@WEIGHTED
def test_names_and_arrays_of_different_lengths_are_zipped(weighted: bool) -> None:
    # FL4Health pairs them with a plain zip: the longer list's extra items are dropped.
    extra_array = [np.array([1.0, 2.0], np.float32), np.array([9.0], np.float32), np.array(["w"])]
    extra_name = [np.array([4.0, 6.0], np.float32), np.array(["w", "b"])]
    assert_matches([(extra_array, 2), (extra_name, 3)], weighted)


@WEIGHTED
def test_a_client_with_no_layers(weighted: bool) -> None:
    nothing = [np.array([], dtype=np.str_)]  # a string names array: FL4Health takes it
    assert_matches([(packed(("w", np.array([1.0, 3.0], np.float32))), 2), (nothing, 5)], weighted)


@WEIGHTED
@pytest.mark.parametrize(
    "bad",
    [
        [np.array([])],  # an empty names array is float64: FL4Health's pseudo-sort fails on it
        packed(("w", np.zeros(0, np.float32))),  # an empty float layer: the same
        packed(("w", np.zeros((2, 0), np.float64))),
    ],
    ids=["empty-float-names", "empty-layer", "empty-2d-layer"],
)
def test_what_fl4health_fails_on_is_refused(bad: list[np.ndarray], weighted: bool) -> None:
    assert_matches([(packed(("w", np.array([1.0, 3.0], np.float32))), 2), (bad, 5)], weighted)


@WEIGHTED
def test_empty_integer_layer_is_averaged(weighted: bool) -> None:
    # No first element is read from an integer array, so FL4Health takes an empty one.
    results = [(packed(("e", np.zeros((0, 3), np.int64))), 2), (packed(("e", np.zeros((1, 3), np.int32))), 3)]
    assert_matches(results, weighted)


@WEIGHTED
def test_non_native_byte_order(weighted: bool) -> None:
    results = [
        (packed(("w", np.array([1.5, -2.25], dtype=">f4"))), 3),
        (packed(("w", np.array([4, 8], dtype=">i8"))), 1),
    ]
    assert_matches(results, weighted)


@WEIGHTED
def test_order_of_arrival_does_not_matter(weighted: bool) -> None:
    # FL4Health pseudo-sorts the clients before summing: any arrival order gives its bits.
    results = _random_results(7, FLOATS, 3000)
    expected = fl4health(results, weighted)
    shuffled = list(results)
    for seed in range(3):
        random.Random(seed).shuffle(shuffled)
        assert_same_bits(aggregate_layers(shuffled, weighted=weighted), expected)
