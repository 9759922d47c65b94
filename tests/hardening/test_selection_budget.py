"""Select and Push count their work, not only their upload: the scores, the k-th search, the selected
entries and the encoded answer, drift norms and FedPM masks are counted against --max-call-bytes and
--max-inflight-bytes before they are allocated - from the declared shapes at the first chunk where those
decide it, from the engine's own counts where only the data do (how many entries tie at the threshold) -
and a call they do not fit is refused with RESOURCE_EXHAUSTED naming the tensor and the figures.

The calls run against ``paramsel serve`` in a process of its own (its log goes to a file), over real gRPC
on loopback; the server's memory is read from /proc. What the server counts for a call is worked out by
the server's own code in this process (``reserved``), and by hand for the arithmetic.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from reserved import reserved, reserved_bytes
from support import PeakGrowth, assert_serving, serve_process

from paramsel import engine
from paramsel.engine import budget, needs
from paramsel.engine.budget import Need, Work
from paramsel.engine.state import TensorSpec
from paramsel.server import inbound
from paramsel.server.limits import CallLimits, Limits
from paramsel.server.memory import ENV
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire import WireLimitError
from paramsel.wire.memory import TUNABLES_ENV
from paramsel.wire.streams import read_frames, write_frames

MODEL, INITIAL = tensor_pb2.SECTION_MODEL, tensor_pb2.SECTION_INITIAL_MODEL
RESULT = tensor_pb2.SECTION_RESULT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FINAL = criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
CHANGE = criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE
SMALLEST_CHANGE = criteria_pb2.SCORE_FUNCTION_SMALLEST_MAGNITUDE_CHANGE
INCREASE = criteria_pb2.SCORE_FUNCTION_LARGEST_INCREASE_IN_MAGNITUDE
SMALLEST_INCREASE = criteria_pb2.SCORE_FUNCTION_SMALLEST_INCREASE_IN_MAGNITUDE
COMPACT = tensor_pb2.POSITION_ENCODING_COMPACT
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
F16 = tensor_pb2.DATA_TYPE_FLOAT16
TIMEOUT = 120  # seconds: a generous bound for calls and waits on a loaded machine, never a speed measure
RSS_GROWTH_BOUND = 64 << 20
IN_TRANSIT = 8 << 20
"""What a call holds beside what it is counted for: request and response frames in transit (a chunk of
up to 3 MiB each way, gRPC's buffers), which the README's sizing adds on top."""
MAX_OVERCOUNT = 3.5
"""The counted figure is an upper bound of the real peak, and not wildly above it."""


# ---------------------------------------------------------------------------------------------------
# Requests


def top_k(
    level: float, fn: criteria_pb2.ScoreFunction.ValueType = FINAL, *, exact_k: bool = False
) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(sparsity_level=level, score_function=fn, exact_k=exact_k)
    )


DRIFT_PERCENTAGE = criteria_pb2.Criterion(
    drift_percentage=criteria_pb2.DriftPercentageCriterion(exchange_percentage=0.5)
)
DRIFT_THRESHOLD = criteria_pb2.Criterion(
    drift_threshold=criteria_pb2.DriftThresholdCriterion(norm_threshold=1e-9)
)
FED_PM = criteria_pb2.Criterion(fed_pm=criteria_pb2.FedPmCriterion(seed=7))
UPDATE_TOP10 = criteria_pb2.Criterion(sparse_update=criteria_pb2.SparseUpdateCriterion(sparsity_level=0.1))
UPDATE_RANDOM10 = criteria_pb2.Criterion(
    sparse_update=criteria_pb2.SparseUpdateCriterion(
        sparsity_level=0.1, selection=criteria_pb2.UPDATE_SELECTION_RANDOM_K, seed=3
    )
)


def frames(
    method: str,
    criterion: criteria_pb2.Criterion,
    model: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor] | None = None,
    **start: Any,
) -> list[Any]:
    """A whole Select or Push request stream."""
    dense = [(MODEL, list(model.items()))]
    if initial is not None:
        dense.append((INITIAL, list(initial.items())))
    if method == "Select":
        select = service_pb2.SelectStart(criterion=criterion, **start)
        return list(
            write_frames(service_pb2.SelectRequest, ("start", select), chunk_size=1 << 20, dense=dense)
        )
    push = service_pb2.PushStart(criterion=criterion, **start)
    return list(write_frames(service_pb2.PushRequest, ("start", push), chunk_size=1 << 20, dense=dense))


def model_of(dtype: torch.dtype = torch.float32, *, scale: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two weight matrices and their biases: 6.3 M entries at ``scale`` 1."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        if dtype in (torch.int8, torch.uint8):
            return torch.randint(-100 if dtype == torch.int8 else 0, 100, shape, generator=g, dtype=dtype)
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "fc1.weight": draw(2048 * scale, 2048),
        "fc1.bias": draw(2048),
        "fc2.weight": draw(1024 * scale, 2048),
        "fc2.bias": draw(2048),
    }


def nudged(model: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """The model a round later: every entry moved a little (integers by a few units)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in model.items():
        if tensor.is_floating_point():
            out[name] = (
                tensor.double() + 0.01 * torch.randn(tensor.shape, generator=g, dtype=torch.float64)
            ).to(tensor.dtype)
        else:
            out[name] = tensor + torch.randint(-3, 4, tensor.shape, generator=g, dtype=tensor.dtype)
    return out


def as_scores(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under FedPM score names."""
    return {
        name.replace("weight", "weight_scores").replace("bias", "bias_scores"): t for name, t in model.items()
    }


def declarations_of(request: list[Any]) -> Any:
    limits = CallLimits(Limits(4, 1 << 50, 1 << 50, 1000, 1 << 40))
    with limits.call() as call:
        for _ in call.watch(iter(request)):
            pass
        return call.declarations


def upload_and_plan(request: list[Any]) -> int:
    """What a call holds reserved once its first chunk is in: its upload and the planned work."""
    limits = CallLimits(Limits(4, 1 << 50, 1 << 50, 1000, 1 << 40))
    with limits.call() as call:
        for _ in call.watch(iter(request), inbound.select_plan):
            pass
        return call.declared + call.work


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """``paramsel serve`` with the default limits; yields its pid and address.

    Its malloc unmaps every block above 128 KiB as it is freed (an operator's tunable, which the server
    leaves alone), as the server did before it kept its memory between calls: what a call holds at peak
    is then what its RSS grows by, not hidden by memory an earlier call left in the heaps."""
    log = tmp_path_factory.mktemp("selection-budget") / "serve.log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TUNABLES_ENV, "glibc.malloc.mmap_threshold=131072")
        patch.delenv(ENV, raising=False)
        with serve_process("--progress-timeout-seconds", str(TIMEOUT), log=log) as (proc, target):
            yield proc.pid, target


def call(target: str, method: str, request: list[Any]) -> list[Any]:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        return list(getattr(stub, method)(iter(request), timeout=TIMEOUT))


def refused(
    target: str, method: str, request: list[Any], pid: int, *, hold: bool
) -> tuple[grpc.RpcError, int]:
    """Sends ``request`` (and, with ``hold``, keeps the stream open after it); returns the refusal and how
    far the server's memory rose meanwhile."""
    release = threading.Event()

    def requests() -> Iterator[Any]:
        yield from request
        if hold:  # the refusal must come while the stream is still open
            release.wait(TIMEOUT)

    try:
        with grpc.insecure_channel(target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            with PeakGrowth(pid) as memory, pytest.raises(grpc.RpcError) as err:
                list(getattr(stub, method)(requests(), timeout=TIMEOUT))
            assert_serving(channel)
    finally:
        release.set()
    return err.value, memory.growth


def first_chunk(request: list[Any]) -> list[Any]:
    """The declarations and the first chunk: the plan is reserved there, before the chunk goes on."""
    cut = next(i for i, f in enumerate(request) if f.WhichOneof("frame") == "chunk")
    return request[: cut + 1]


# ---------------------------------------------------------------------------------------------------
# Refused before the work is allocated


@pytest.mark.slow  # a `paramsel serve` process
@pytest.mark.parametrize("method", ["Select", "Push"])
def test_int8_scores_widened_by_another_tensor_are_refused_before_they_are_built(
    tmp_path: Path, method: str
) -> None:
    # An int8 model of 16 Mi entries with one float64 bias: every int8 score is compared as float64, a
    # 128 MiB copy of a 16 MiB upload. The upload fits the limit; the work does not.
    model = {
        "fc1.weight": torch.ones(4096, 4096, dtype=torch.int8),
        "fc1.bias": torch.ones(4096, dtype=torch.float64),
    }
    request = frames(method, top_k(0.1), model)
    limit = 64 << 20
    planned = upload_and_plan(first_chunk(request))
    assert planned > limit > (16 << 20) + 4096 * 8
    args = ("--max-call-bytes", str(limit), "--progress-timeout-seconds", str(TIMEOUT))
    with serve_process(*args, log=tmp_path / "serve.log") as (proc, target):
        call(target, method, frames(method, top_k(0.5), {"w": torch.arange(10, dtype=torch.int8)}))  # warm
        err, growth = refused(target, method, first_chunk(request), proc.pid, hold=True)
        details = err.details() or ""
        assert err.code() == EXHAUSTED, details
        assert "tensor 'fc1.weight' needs" in details, details
        assert "over shape [4096, 4096] at 8 bytes per element (torch.float64" in details, details
        assert f"the call needs {planned} bytes in all" in details, details
        assert f"limit of {limit} bytes per call (--max-call-bytes)" in details, details
        assert growth < RSS_GROWTH_BOUND, f"the server's memory rose by {growth >> 20} MiB"
        assert call(target, method, frames(method, top_k(0.5), {"w": torch.arange(10, dtype=torch.int8)}))


@pytest.mark.slow  # a `paramsel serve` process
def test_ties_at_the_threshold_are_counted_before_the_answer_is_gathered(tmp_path: Path) -> None:
    # The top 10 % of a constant tensor is all of it: FL4Health sends every entry at or above the k-th
    # largest score. The answer is counted once the threshold is known, from the entries that meet it.
    n = 4 << 20
    constant = frames("Select", top_k(0.1), {"w": torch.full((n,), 0.5)}, position_encoding=FLAT)
    distinct = frames("Select", top_k(0.1), {"w": torch.randn(n)}, position_encoding=FLAT)
    upload, work = reserved("Select", constant)
    assert work >= n * (8 + 4)  # every entry selected: int64 positions and float32 values
    limit = reserved_bytes("Select", distinct)  # what a tenth of the entries would be counted for
    assert limit < upload + work
    args = ("--max-call-bytes", str(limit), "--progress-timeout-seconds", str(TIMEOUT))
    with serve_process(*args, log=tmp_path / "serve.log") as (proc, target):
        assert call(target, "Select", distinct)  # it fits exactly
        err, growth = refused(target, "Select", constant, proc.pid, hold=False)
        details = err.details() or ""
        assert err.code() == EXHAUSTED, details
        assert f"tensor 'w' needs {n * 12 + n + n} bytes ({n} selected entries" in details, details
        assert "(ties at the threshold included)" in details, details
        assert f"limit of {limit} bytes per call (--max-call-bytes)" in details, details
        # Refused before the answer was gathered: the server never held more than it had counted.
        assert growth < limit + IN_TRANSIT, (growth, limit)
    # With room for it, the same call is answered: every entry, as FL4Health sends them.
    args = ("--max-call-bytes", str(upload + work), "--progress-timeout-seconds", str(TIMEOUT))
    with serve_process(*args, log=tmp_path / "serve2.log") as (_, target):
        answer = read_frames(
            iter(call(target, "Select", constant)),
            first="header",
            sparse_sections=frozenset({RESULT}),
            max_bytes=1 << 30,
        )
        (tensor,) = answer.sparse[RESULT]
        assert tensor.values.numel() == n
        assert answer.first.top_k.selected_entries == n


@pytest.mark.slow  # a `paramsel serve` process
def test_the_inflight_budget_counts_select_work(tmp_path: Path) -> None:
    request = frames("Select", top_k(0.1), {"w": torch.randn(2 << 20)})
    upload = (2 << 20) * 4
    one = upload_and_plan(request)
    cap = one * 3 // 2  # room for one such call's upload and work, not two
    assert 2 * upload < cap  # both uploads fit together: only their work can be refused
    assert reserved_bytes("Select", request) <= cap  # and all of one call's, the answer included
    args = ("--max-inflight-bytes", str(cap), "--progress-timeout-seconds", str(TIMEOUT))
    with (
        serve_process(*args, log=tmp_path / "serve.log") as (_, target),
        grpc.insecure_channel(target) as channel,
    ):
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        release = threading.Event()
        outcomes: list[Any] = [None, None]

        def run(index: int) -> None:
            def held() -> Iterator[Any]:
                # Every frame (the first chunk reserves the work), then the stream is held open: both
                # calls hold their reservation until one is refused.
                yield from request
                release.wait(TIMEOUT)

            try:
                outcomes[index] = list(stub.Select(held(), timeout=TIMEOUT))
            except grpc.RpcError as error:
                outcomes[index] = error
                release.set()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        assert release.wait(TIMEOUT), "neither call was refused while both held their reservation"
        for thread in threads:
            thread.join(TIMEOUT)
        errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        answers = [o for o in outcomes if isinstance(o, list)]
        assert (len(errors), len(answers)) == (1, 1), outcomes
        details = errors[0].details() or ""
        assert errors[0].code() == EXHAUSTED, details
        assert "tensor 'w' needs" in details, details
        assert f"limit of {cap} (--max-inflight-bytes)" in details, details
        # Both reservations are gone: the call runs again, and its second reservation (the answer) fits.
        assert list(stub.Select(iter(request), timeout=TIMEOUT))
        assert_serving(channel)


@pytest.mark.slow  # a `paramsel serve` process
def test_a_float32_push_fits_the_default_limits_and_selects_as_the_engine(served: tuple[int, str]) -> None:
    _, target = served
    model = model_of(scale=2)
    initial = nudged(model)
    request = frames("Push", top_k(0.1, CHANGE), model, initial)
    assert reserved_bytes("Push", request) < 8 << 30
    got = read_frames(
        iter(call(target, "Push", request)),
        first="header",
        dense_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
        unique_names=False,
    )
    expected = engine.select_top_k(
        model, initial, sparsity_level=0.1, score_function=engine.ScoreFunction.LARGEST_MAGNITUDE_CHANGE
    )
    arrays = [tensor for _, tensor in got.dense[RESULT]]
    n = len(expected.tensors)
    assert len(arrays) == 3 * n
    for i, sent in enumerate(expected.tensors):
        assert torch.equal(arrays[i], sent.values)  # bit for bit
        assert torch.equal(
            arrays[n + i].reshape(-1, len(sent.shape)),
            torch.from_numpy(np.stack(np.unravel_index(sent.positions.numpy(), sent.shape), axis=1)),
        )


# ---------------------------------------------------------------------------------------------------
# The counted figure bounds the real peak


@functools.cache
def _model(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return model_of(dtype)


@functools.cache
def _later(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return nudged(_model(dtype))


def _case(name: str) -> tuple[str, criteria_pb2.Criterion, dict[str, torch.Tensor], Any, dict[str, Any]]:
    """(method, criterion, model, initial model or None, start fields) of a case, built when it runs."""
    f32, f16, f64, i8 = torch.float32, torch.float16, torch.float64, torch.int8
    if name == "push-top10-change-float32":
        return "Push", top_k(0.1, CHANGE), _model(f32), _later(f32), {}
    if name == "push-top100-final-float32":
        return "Push", top_k(1.0), _model(f32), None, {}
    if name == "select-top50-increase-compact":
        return (
            "Select",
            top_k(0.5, SMALLEST_INCREASE),
            _model(f32),
            _later(f32),
            {"position_encoding": COMPACT},
        )
    if name == "select-top10-exact-k":
        return "Select", top_k(0.1, SMALLEST_CHANGE, exact_k=True), _model(f32), _later(f32), {}
    if name == "select-top10-too-few-to-sample":
        small = {"w": _model(f32)["fc1.weight"][:256]}
        return "Select", top_k(0.1, INCREASE), small, nudged(small), {}
    if name == "select-top10-int8-widened-to-float64":
        ints = _model(i8)
        return "Select", top_k(0.1), dict(ints, **{"fc2.bias": ints["fc2.bias"].double()}), None, {}
    if name == "push-top10-change-int8":
        return "Push", top_k(0.1, CHANGE), _model(i8), _later(i8), {}
    if name == "push-top10-change-float16":
        return "Push", top_k(0.1, CHANGE), _model(f16), _later(f16), {}
    if name == "select-top10-float64-sent-as-float16":
        return "Select", top_k(0.1), _model(f64), None, {"value_dtype": F16}
    if name == "select-top10-all-tied":
        constant = {n: torch.full_like(t, 0.5) for n, t in _model(f32).items()}
        return "Select", top_k(0.1), constant, None, {"position_encoding": FLAT}
    if name == "select-drift-float16":
        return "Select", DRIFT_PERCENTAGE, _model(f16), _later(f16), {"value_dtype": F16}
    if name == "push-drift-int8":
        return "Push", DRIFT_THRESHOLD, _model(i8), _later(i8), {}
    if name == "select-fedpm-float32":
        return "Select", FED_PM, as_scores(_model(f32)), None, {}
    if name == "push-fedpm-int8":
        return "Push", FED_PM, as_scores(_model(i8)), None, {}
    if name == "select-update-top10-float32":
        return "Select", UPDATE_TOP10, _later(f32), _model(f32), {}
    if name == "push-update-random10-float32-as-float16":
        return "Push", UPDATE_RANDOM10, _later(f32), _model(f32), {"value_dtype": F16}
    if name == "select-update-random10-compact":
        return "Select", UPDATE_RANDOM10, _later(f32), _model(f32), {"position_encoding": COMPACT}
    raise AssertionError(name)


CASES = [
    "push-top10-change-float32",
    "push-top100-final-float32",
    "select-top50-increase-compact",
    "select-top10-exact-k",
    "select-top10-too-few-to-sample",
    "select-top10-int8-widened-to-float64",
    "push-top10-change-int8",
    "push-top10-change-float16",
    "select-top10-float64-sent-as-float16",
    "select-top10-all-tied",
    "select-drift-float16",
    "push-drift-int8",
    "select-fedpm-float32",
    "push-fedpm-int8",
    "select-update-top10-float32",
    "push-update-random10-float32-as-float16",
    "select-update-random10-compact",
]


@pytest.mark.slow  # a `paramsel serve` process, and models of millions of entries
@pytest.mark.parametrize("case", CASES)
def test_the_counted_figure_bounds_the_real_peak(served: tuple[int, str], case: str) -> None:
    pid, target = served
    method, criterion, model, initial, start = _case(case)
    request = frames(method, criterion, model, initial, **start)
    counted = reserved_bytes(method, request)
    call(target, method, request)  # the first time warms the server's code paths and threads
    with PeakGrowth(pid) as memory:
        call(target, method, request)
    held, ratio = memory.growth, counted / max(memory.growth, 1)
    print(f"{case}: held {held / 2**20:.1f} MiB at peak, counted {counted / 2**20:.1f} MiB ({ratio:.2f}x)")
    assert held <= counted + IN_TRANSIT, f"held {held >> 20} MiB, counted {counted >> 20} MiB"
    assert counted <= MAX_OVERCOUNT * held, f"held {held >> 20} MiB, counted {counted >> 20} MiB"


# ---------------------------------------------------------------------------------------------------
# The arithmetic, by hand


def test_top_k_counts_scores_in_their_dtype_and_copies_in_the_promoted_one() -> None:
    fn = engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE
    model = [TensorSpec("w", torch.int8, (4096, 4096)), TensorSpec("b", torch.float64, (4096,))]
    size = 4096 * 4096
    # |w| of int8 is int8: 1 byte per score, held until its tensor is selected; the float64 bias's 8.
    # Compared as float64 (torch.cat's promotion), the int8 scores are copied at 8 bytes each. 16 Mi
    # entries are sampled: the sample (held) and two bool masks over the largest tensor (scratch).
    assert [(n.name, n.held, n.scratch) for n in budget.top_k_work(model, fn).needs] == [
        ("w", size, 0),
        ("b", 4096 * 8, 0),
        ("w", 8 * size, 0),
        ("w", ((1 << 16) + 2) * 64, 2 * size),
    ]
    assert budget.top_k_work(model, fn).nbytes == size + 4096 * 8 + 8 * size + ((1 << 16) + 2) * 64 + 2 * size


def test_top_k_scores_over_the_initial_model_need_no_tensor_but_increase_needs_a_temporary() -> None:
    model = [TensorSpec("w", torch.float32, (1000,))]
    change = budget.top_k_work(model, engine.ScoreFunction.LARGEST_MAGNITUDE_CHANGE, overwrite_initial=True)
    # Written over w0: nothing held; 1000 entries are too few to sample: all joined and partitioned.
    assert change.nbytes == 1000 * 4
    increase = budget.top_k_work(
        model, engine.ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE, overwrite_initial=True
    )
    assert increase.nbytes == 1000 * 4  # |w| beside the scores, then the partition: one at a time
    apart = budget.top_k_work(model, engine.ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE)
    assert apart.nbytes == 1000 * 4 + 1000 * 4  # the scores held, and |w0| or the partition beside them
    half = budget.top_k_work(
        [TensorSpec("h", torch.float16, (1000,))], engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE
    )
    assert half.nbytes == 1000 * 2 + 1000 * (2 + 4)  # float16 scores, partitioned beside a float32 copy
    # torch cannot score bool: the engine refuses it before scoring, so nothing from it on is counted.
    refused = budget.top_k_work(
        [TensorSpec("a", torch.float32, (10,)), TensorSpec("b", torch.bool, (10**9,))],
        engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE,
    )
    assert refused.nbytes == 40


def test_drift_and_fedpm_are_counted_one_tensor_at_a_time() -> None:
    model = [TensorSpec("a.weight_scores", torch.float16, (100, 10)), TensorSpec("b", torch.int8, (500,))]
    drift = budget.drift_work(model)
    # w - w0 in its dtype, and a float32 copy for the norm: 2 + 4 bytes per float16 entry, 1 + 4 per int8.
    assert [(n.held, n.scratch) for n in drift.needs] == [(0, 1000 * 6), (0, 500 * 5)]
    assert drift.nbytes == 6000
    fedpm = budget.fedpm_work(model)
    # Only score tensors: an int64 mask each (held), and float64 probabilities, draws and their
    # comparison beside it (8 + 8 + 1 bytes, less the mask's 8).
    assert [(n.name, n.held, n.scratch) for n in fedpm.needs] == [("a.weight_scores", 8000, 9000)]


def test_the_engine_reserves_the_answer_with_its_ties_before_gathering_it() -> None:
    seen: list[Need] = []
    current = {"w": torch.full((1000,), 0.5), "v": torch.tensor([0.0, 0.5, 0.25])}
    result = engine.select_top_k(
        current,
        None,
        sparsity_level=0.1,
        score_function=engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE,
        reserve=seen.append,
    )
    plain = engine.select_top_k(
        current, None, sparsity_level=0.1, score_function=engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE
    )
    # The same selection with or without a callback: every tie at 0.5 (1001 entries, not k = 101).
    assert [(t.name, t.values.tolist(), t.positions.tolist()) for t in result.tensors] == [
        (t.name, t.values.tolist(), t.positions.tolist()) for t in plain.tensors
    ]
    assert (result.k, result.selected_entries) == (101, 1001)
    selected = [n for n in seen if n.answer_entries]
    assert [(n.name, n.answer_entries, n.held) for n in selected] == [("w", 1000, 1000 * 12), ("v", 1, 12)]
    assert selected[0].scratch == 1000 + 1000  # the mask over the tensor, and the is-zero mask


def test_a_refusing_callback_stops_the_engine_before_it_allocates() -> None:
    def refuse(need: Need) -> None:
        raise WireLimitError(f"tensor '{need.name}' needs {need.nbytes} bytes ({need.what})")

    with pytest.raises(WireLimitError, match=r"tensor 'w' needs 14000 bytes \(1000 selected entries"):
        engine.select_top_k(
            {"w": torch.ones(1000)},
            None,
            sparsity_level=0.5,
            score_function=engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE,
            reserve=lambda need: refuse(need) if need.answer_entries else None,
        )


def test_zeros_dropped_from_the_answer_are_counted_only_when_there_are_some() -> None:
    seen: list[Need] = []
    engine.select_top_k(
        {"w": torch.zeros(100)},
        None,
        sparsity_level=1.0,
        score_function=engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE,
        reserve=seen.append,
    )
    assert [n.scratch for n in seen if "drop the zeros" in n.what] == [100 * (1 + 16 + 4)]
    seen.clear()
    engine.select_top_k(
        {"w": torch.ones(100)},
        None,
        sparsity_level=1.0,
        score_function=engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE,
        reserve=seen.append,
    )
    assert not [n for n in seen if "drop the zeros" in n.what]


def test_reservations_made_one_after_another_add_up_as_one_work() -> None:
    limits = CallLimits(Limits(4, 1 << 40, 1 << 40, 1000, 1 << 31))
    steps = [
        Need("a", 100, 1000, "x"),
        Need("b", 10, 400, "y"),
        Need("a", 5, 2500, "z"),
        Need("c", 1, 0, "w"),
    ]
    with limits.call() as call:
        for step in steps:
            call.reserve_need(step)
        assert call.work == Work(tuple(steps)).nbytes == 116 + 2500
        assert limits.inflight_bytes == 116 + 2500
    assert limits.inflight_bytes == 0


def test_the_select_plan_counts_objects_and_the_criterion() -> None:
    model = {"w": torch.ones(300), "b": torch.ones(5)}
    request = frames("Select", top_k(0.5, CHANGE), model, model)
    work = inbound.select_plan(declarations_of(request))
    # Objects: 8 KiB per model tensor, 1 KiB per initial-model tensor. Scores written over the initial
    # model sent without a digest; 305 entries joined and partitioned in float32.
    assert (
        work.nbytes == 2 * inbound.TENSOR_OVERHEAD_BYTES + 2 * inbound.LAYOUT_ENTRY_OVERHEAD_BYTES + 305 * 4
    )
    # Named by digest, the initial model is not this call's to overwrite: the scores are held too.
    digest = frames(
        "Select",
        top_k(0.5, CHANGE),
        model,
        model,
        initial_model_digest=tensor_pb2.ModelDigest(sha256=b"x" * 32),
    )
    assert inbound.select_plan(declarations_of(digest)).nbytes == work.nbytes + 305 * 4
    # A criterion the engine refuses outright is counted as nothing beyond the objects.
    unknown = frames("Select", criteria_pb2.Criterion(), model)
    assert inbound.select_plan(declarations_of(unknown)).nbytes == 2 * inbound.TENSOR_OVERHEAD_BYTES


def test_needs_name_what_they_count() -> None:
    need = needs.selected_need("w", 3, 4, 100)
    assert (need.held, need.scratch) == (3 * 12, 100 + 3)
    assert (
        need.what == "3 selected entries (ties at the threshold included): int64 positions and 4 bytes values"
    )
    assert needs.candidates_need("w", 1, 8).what.startswith("1 candidate for the k-th largest score")
