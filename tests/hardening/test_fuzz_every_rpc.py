"""Bad input at scale, for every rpc: valid streams of Select, Push, Pull and Aggregate, then mutated
(cut short, reordered, frames dropped or repeated, chunk lengths wrong, shapes huge or negative, values
NaN, enums unknown, random or bit-flipped frames). Whatever arrives, the answer is success or a
deliberate status (never UNKNOWN or INTERNAL), the server stays SERVING, and its memory stays bounded.

Each test runs against a plain server and against one requiring TLS and a bearer token (see secured.py).
There, every fuzzed call is also sent without a good token, and is refused UNAUTHENTICATED; and with the
token it gets exactly the status a plain reference server, sent the same calls in the same order, gives.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secured import CONFIGS, UNAUTHENTICATED, Metadata, Security, security
from support import assert_serving, server_logs, start_server

from paramsel.client import Client, ParamselError, StatusCode
from paramsel.server.app import SERVICE_NAME, RunningServer
from paramsel.server.config import Limits
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import SparseOut, write_contributions, write_frames

pytestmark = pytest.mark.slow  # hundreds of fuzzed calls per rpc

ACCEPTABLE = {
    None,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
RPCS = ("Select", "Push", "Pull", "Aggregate")
MESSAGES = {
    "Select": service_pb2.SelectRequest,
    "Push": service_pb2.PushRequest,
    "Pull": service_pb2.PullRequest,
    "Aggregate": service_pb2.AggregateRequest,
}
MODEL, INITIAL, PAYLOAD = (
    tensor_pb2.SECTION_MODEL,
    tensor_pb2.SECTION_INITIAL_MODEL,
    tensor_pb2.SECTION_PAYLOAD,
)
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
MAX_CALL_BYTES = 16 << 20
RSS_BOUND = 200 << 20
CALL_TIMEOUT = 60  # seconds: a hang fails as DEADLINE_EXCEEDED; a slow (loaded) machine does not
# Shapes no server may allocate: above the per-tensor element limit, overflowing int64, or negative.
HUGE = [2**31 + 1, 2**40, 2**62, 2**63 - 1, -1, -(2**63)]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
# The secured configuration sends each example three times (with the token, without, and to the plain
# reference server), over TLS: it runs half the examples, taking about as long as the plain run.
SECURED_SHARE = 2


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Fuzzed:
    """A server of one configuration, a channel to it as its clients connect, and (secured) a plain
    reference server that gets the same calls."""

    def __init__(
        self, security: Security, server: RunningServer, channel: grpc.Channel, reference: grpc.Channel | None
    ) -> None:
        self.security = security
        self.server = server
        self.channel = channel
        self.reference = reference
        self.baseline = rss()

    def examples(self, count: int) -> int:
        return max(count // SECURED_SHARE, 10) if self.security.secured else count

    @staticmethod
    def send(
        channel: grpc.Channel, rpc: str, frames: list[bytes], metadata: Metadata
    ) -> grpc.StatusCode | None:
        """Sends already-serialized frames, so that any bytes at all can be sent."""
        method = channel.stream_stream(
            f"/{SERVICE_NAME}/{rpc}", request_serializer=None, response_deserializer=None
        )
        try:
            for _ in method(iter(frames), timeout=CALL_TIMEOUT, metadata=metadata):
                pass
        except grpc.RpcError as err:
            return err.code()
        return None

    def outcome(self, rpc: str, frames: list[bytes], bad_auth: int = 0) -> grpc.StatusCode | None:
        """The status of ``frames`` sent as a client of this configuration sends them (over TLS, with
        the token, when secured). When secured, also checks that the same frames with the ``bad_auth``-th
        bad authorization are refused UNAUTHENTICATED, and that the plain reference server answers them
        with the same status."""
        code = self.send(self.channel, rpc, frames, self.security.metadata)
        if self.reference is not None:
            auth = self.security.bad_auth()[bad_auth % len(self.security.bad_auth())]
            refused = self.send(self.channel, rpc, frames, auth)
            assert refused == UNAUTHENTICATED, f"{rpc} with authorization {auth}: {refused}"
            expected = self.send(self.reference, rpc, frames, ())
            assert code == expected, f"{rpc} with the token over TLS: {code}; a plain server: {expected}"
        return code

    def check_memory(self) -> None:
        grown = rss() - self.baseline
        assert grown < RSS_BOUND, f"RSS grew {grown >> 20} MiB during the fuzzing"


@pytest.fixture(scope="module", params=CONFIGS)
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp(f"fuzz-{request.param.replace('+', '-')}")
    secured = security(request.param, root)
    with server_logs(root / "server.log") as log:
        running = start_server(secured.server_config(limits=Limits(max_call_bytes=MAX_CALL_BYTES)))
        reference = None
        if secured.secured:
            reference = start_server(
                Security("plain").server_config(limits=Limits(max_call_bytes=MAX_CALL_BYTES))
            )
        try:
            with secured.channel(running.target) as channel:
                if reference is None:
                    yield Fuzzed(secured, running, channel, None)
                else:
                    with grpc.insecure_channel(reference.target) as plain:
                        yield Fuzzed(secured, running, channel, plain)
        finally:
            running.stop(0)
            if reference is not None:
                reference.stop(0)
        if secured.token is not None:
            assert secured.token not in log.read_text(), "the bearer token was logged"


BAD_AUTH = st.integers(0, 63)  # which bad authorization the secured configuration also sends


# ---------------------------------------------------------------------------------------------------
# Valid streams


def tensors(draw: st.DrawFn, prefix: str = "t") -> list[tuple[str, torch.Tensor]]:
    count = draw(st.integers(1, 3))
    out = []
    for i in range(count):
        shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
        values = draw(
            st.lists(st.floats(-100, 100, width=32), min_size=math.prod(shape), max_size=math.prod(shape))
        )
        out.append((f"{prefix}{i}", torch.tensor(values, dtype=torch.float32).reshape(shape)))
    return out


def criterion(draw: st.DrawFn) -> criteria_pb2.Criterion:
    fraction = draw(st.sampled_from([0.1, 0.5, 1.0]))
    return draw(
        st.sampled_from(
            [
                criteria_pb2.Criterion(
                    top_k=criteria_pb2.TopKCriterion(
                        sparsity_level=fraction,
                        # 1-6: FL4Health's functions; 7: SUPPLIED, whose scores valid_stream adds
                        score_function=criteria_pb2.ScoreFunction.ValueType(draw(st.integers(1, 7))),
                    )
                ),
                criteria_pb2.Criterion(
                    drift_threshold=criteria_pb2.DriftThresholdCriterion(norm_threshold=fraction)
                ),
                criteria_pb2.Criterion(
                    drift_percentage=criteria_pb2.DriftPercentageCriterion(exchange_percentage=fraction)
                ),
            ]
        )
    )


@st.composite
def valid_stream(draw: st.DrawFn, rpc: str) -> list[Any]:
    size = draw(st.integers(4, 64))  # small chunks: several to cut, drop and reorder
    if rpc in ("Select", "Push"):
        model = tensors(draw)
        initial = [(name, t + 1) for name, t in model]
        dense = [(MODEL, model), (INITIAL, initial)]
        start: Any = (
            service_pb2.SelectStart(criterion=criterion(draw))
            if rpc == "Select"
            else service_pb2.PushStart(criterion=criterion(draw))
        )
        if start.criterion.top_k.score_function == criteria_pb2.SCORE_FUNCTION_SUPPLIED:
            dense.append((tensor_pb2.SECTION_SCORES, [(name, t.abs()) for name, t in model]))
        return list(write_frames(MESSAGES[rpc], ("start", start), chunk_size=size, dense=dense))
    if rpc == "Pull":
        coords = draw(
            st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=1, max_size=4, unique=True)
        )
        payload = SparseOut("w", (3, 4), torch.ones(len(coords)), torch.tensor(coords, dtype=torch.int64))
        return list(
            write_frames(
                service_pb2.PullRequest,
                ("start", service_pb2.PullStart(payload_kind=service_pb2.PAYLOAD_KIND_SPARSE_COO)),
                chunk_size=size,
                layout=[("w", torch.zeros(3, 4))],
                sparse=[(PAYLOAD, [payload], COO)],
            )
        )
    layer = tensors(draw, "x")
    contributions: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]] = [
        (draw(st.integers(1, 50)), [(n, t * (i + 1)) for n, t in layer], []) for i in range(2)
    ]
    start = service_pb2.AggregateStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS)
    return list(
        write_contributions(
            service_pb2.AggregateRequest,
            ("start", start),
            contributions,
            section=PAYLOAD,
            encoding=COO,
            chunk_size=size,
        )
    )


# ---------------------------------------------------------------------------------------------------
# Mutations


def _specs(frames: list[Any]) -> list[Any]:
    out = []
    for frame in frames:
        kind = frame.WhichOneof("frame")
        if kind in ("tensors", "sparse_tensors", "layout"):
            out.extend(getattr(frame, kind).tensors)
    return out


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 5.28+ has is_repeated and deprecates label; protobuf 4 has only label.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _enum_fields(message: Any) -> list[tuple[Any, FieldDescriptor]]:
    """Every enum field reachable from ``message`` (through set sub-messages), with its owner."""
    out = []
    for field in message.DESCRIPTOR.fields:
        if _is_repeated(field):
            continue
        if field.type == FieldDescriptor.TYPE_ENUM:
            out.append((message, field))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and message.HasField(field.name):
            out.extend(_enum_fields(getattr(message, field.name)))
    return out


MUTATIONS = (
    "cut",
    "reorder",
    "drop",
    "repeat",
    "short_chunk",
    "long_chunk",
    "offset",
    "huge_shape",
    "dtype",
    "nan",
    "enum",
    "digest",
    "random_frame",
    "bit_flip",
    "no_start",
)


@st.composite
def mutated(draw: st.DrawFn, rpc: str) -> tuple[str, list[bytes]]:
    frames = draw(valid_stream(rpc))
    mutation = draw(st.sampled_from(MUTATIONS))
    chunks = [i for i, f in enumerate(frames) if f.WhichOneof("frame") == "chunk"]
    specs = _specs(frames)
    if mutation == "cut":
        frames = frames[: draw(st.integers(0, len(frames) - 1))]
    elif mutation == "reorder":
        frames = draw(st.permutations(frames))
    elif mutation == "drop":
        del frames[draw(st.integers(0, len(frames) - 1))]
    elif mutation == "repeat":
        i = draw(st.integers(0, len(frames) - 1))
        frames.insert(i, frames[i])
    elif mutation in ("short_chunk", "long_chunk", "offset", "nan") and chunks:
        target = frames[draw(st.sampled_from(chunks))].chunk
        if mutation == "short_chunk":
            target.data = target.data[: draw(st.integers(0, max(len(target.data) - 1, 0)))]
        elif mutation == "long_chunk":
            target.data += draw(st.binary(min_size=1, max_size=16))
        elif mutation == "offset":
            target.offset_bytes = draw(st.sampled_from([-1, -(2**63), 1, 3, 2**40, 2**63 - 1]))
        else:
            nan = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float32).numpy().tobytes()
            target.data = (nan * (len(target.data) // 12 + 1))[: len(target.data)]
    elif mutation == "huge_shape" and specs:
        spec = draw(st.sampled_from(specs))
        del spec.shape[:]
        spec.shape.extend(draw(st.lists(st.sampled_from([*HUGE, 2**32, 3]), min_size=1, max_size=3)))
    elif mutation == "dtype" and specs:
        draw(st.sampled_from(specs)).dtype = draw(st.sampled_from([0, 2, 5, 10, 11, 99, -1, 2**31 - 1]))
    elif mutation == "enum":
        fields = [f for frame in frames for f in _enum_fields(frame)]
        if fields:
            owner, field = draw(st.sampled_from(fields))
            setattr(owner, field.name, draw(st.sampled_from([-1, 6, 7, 99, 2**31 - 1])))
    elif mutation == "digest" and frames[0].WhichOneof("frame") == "start":
        start = frames[0].start
        if "initial_model_digest" in start.DESCRIPTOR.fields_by_name:
            start.initial_model_digest.sha256 = draw(st.binary(max_size=40))
    encoded = [frame.SerializeToString() for frame in frames]
    if mutation == "random_frame":
        encoded.insert(draw(st.integers(0, len(encoded))), draw(st.binary(max_size=64)))
    elif mutation == "bit_flip" and encoded:
        i = draw(st.integers(0, len(encoded) - 1))
        if encoded[i]:
            raw = bytearray(encoded[i])
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << draw(st.integers(0, 7))
            encoded[i] = bytes(raw)
    elif mutation == "no_start":
        encoded = encoded[1:]
    return mutation, encoded


# ---------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("rpc", RPCS)
def test_valid_streams_succeed(fuzzed: Fuzzed, rpc: str) -> None:
    """The unmutated streams are accepted, so each mutation is what a failure answers."""

    @settings(FUZZ, max_examples=10)
    @given(frames=valid_stream(rpc), bad_auth=BAD_AUTH)
    def run(frames: list[Any], bad_auth: int) -> None:
        assert fuzzed.outcome(rpc, [f.SerializeToString() for f in frames], bad_auth) is None

    run()


@pytest.mark.parametrize("rpc", RPCS)
def test_mutated_streams_get_deliberate_statuses(fuzzed: Fuzzed, rpc: str) -> None:
    @settings(FUZZ, max_examples=fuzzed.examples(FUZZ.max_examples))
    @given(case=mutated(rpc), bad_auth=BAD_AUTH)
    def run(case: tuple[str, list[bytes]], bad_auth: int) -> None:
        mutation, frames = case
        code = fuzzed.outcome(rpc, frames, bad_auth)
        assert code in ACCEPTABLE, f"{rpc} after {mutation}: {code}"
        assert_serving(fuzzed.channel)

    run()
    fuzzed.check_memory()


@pytest.mark.parametrize("rpc", RPCS)
def test_random_bytes_get_deliberate_statuses(fuzzed: Fuzzed, rpc: str) -> None:
    @settings(FUZZ, max_examples=fuzzed.examples(60))
    @given(frames=st.lists(st.binary(max_size=128), max_size=6), bad_auth=BAD_AUTH)
    def run(frames: list[bytes], bad_auth: int) -> None:
        code = fuzzed.outcome(rpc, frames, bad_auth)
        assert code in ACCEPTABLE, f"{rpc}: {code}"

    run()
    assert_serving(fuzzed.channel)
    fuzzed.check_memory()


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("dims", [[2**31 + 1], [2**32, 2**32], [-1], [2**20, 2**20, 2**20], [-(2**63)]])
def test_huge_and_negative_declarations(fuzzed: Fuzzed, rpc: str, dims: list[int]) -> None:
    """A declaration no server could hold is refused before anything is allocated."""
    spec = tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=dims)
    message = MESSAGES[rpc]
    if rpc == "Pull":
        first = message(start=service_pb2.PullStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS))
        frames = [first, message(layout=tensor_pb2.StateLayout(tensors=[spec]))]
    elif rpc == "Aggregate":
        first = message(start=service_pb2.AggregateStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS))
        frames = [first, message(contribution=service_pb2.Contribution(num_examples=1))]
    else:
        crit = criteria_pb2.Criterion(
            top_k=criteria_pb2.TopKCriterion(
                sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
            )
        )
        start = service_pb2.SelectStart if rpc == "Select" else service_pb2.PushStart
        frames = [message(start=start(criterion=crit))]
    section = {"Pull": PAYLOAD, "Aggregate": PAYLOAD}.get(rpc, MODEL)
    frames.append(message(tensors=tensor_pb2.TensorManifest(section=section, tensors=[spec])))
    frames.append(message(chunk=tensor_pb2.Chunk(section=section, offset_bytes=0, data=b"\0" * 64)))
    code = fuzzed.outcome(rpc, [f.SerializeToString() for f in frames], bad_auth=len(dims))
    assert code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert_serving(fuzzed.channel)
    fuzzed.check_memory()


def test_pull_layout_counts_against_the_call_limit(fuzzed: Fuzzed) -> None:
    n = MAX_CALL_BYTES  # float32 elements: 4x the call limit in bytes
    spec = tensor_pb2.SparseTensorSpec(
        name="w",
        dtype=tensor_pb2.DATA_TYPE_FLOAT32,
        shape=[n],
        nnz=1,
        position_encoding=tensor_pb2.POSITION_ENCODING_FLAT_INT64,
        positions_size_bytes=8,
    )
    frames = [
        service_pb2.PullRequest(
            start=service_pb2.PullStart(payload_kind=service_pb2.PAYLOAD_KIND_SPARSE_COO)
        ),
        service_pb2.PullRequest(
            layout=tensor_pb2.StateLayout(
                tensors=[tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[n])]
            )
        ),
        service_pb2.PullRequest(sparse_tensors=tensor_pb2.SparseManifest(section=PAYLOAD, tensors=[spec])),
        service_pb2.PullRequest(chunk=tensor_pb2.Chunk(section=PAYLOAD, offset_bytes=0, data=b"\0" * 12)),
    ]
    assert (
        fuzzed.outcome("Pull", [f.SerializeToString() for f in frames]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_stub_and_raw_calls_agree(fuzzed: Fuzzed) -> None:
    """The raw-bytes path used above is the same service the generated stub reaches."""
    crit = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=1.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    frames = [service_pb2.SelectRequest(start=service_pb2.SelectStart(criterion=crit))]
    stub = service_pb2_grpc.ParameterSelectionServiceStub(fuzzed.channel)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Select(iter(frames), timeout=CALL_TIMEOUT, metadata=fuzzed.security.metadata))
    assert err.value.code() == fuzzed.outcome("Select", [f.SerializeToString() for f in frames])


def test_the_sdk_reaches_the_server_as_configured(fuzzed: Fuzzed) -> None:
    """The configuration is the one an SDK user sets up: Connection(ca_file=..., token=...) is served,
    and (secured) the same connection without its token is refused."""
    target = fuzzed.server.target
    assert Client(connection=fuzzed.security.connection(target)).server_info().server_version
    if fuzzed.security.secured:
        with pytest.raises(ParamselError) as err:
            Client(connection=fuzzed.security.connection(target, token=False)).server_info()
        assert err.value.status == StatusCode.UNAUTHENTICATED
    assert_serving(fuzzed.channel)
