"""The demo's coordinator <-> client protocol: unary gRPC calls whose messages are numpy arrays.

Registered with gRPC's generic handlers (no .proto): every request and response is a :class:`Message`,
a few named fields plus a list of arrays, written as consecutive ``.npy`` records (``np.save``) and read
back with ``np.load(allow_pickle=False)``; names travel as unicode arrays, which need no pickle.

A run's *payload* is what its clients submit and fetch. Top-k runs (``DemoConfig.compact``) exchange
paramsel's compact payload (``push_compact`` / ``pack_compact`` bytes, read with ``unpack_compact``) as
one 1-d uint8 array; the other runs (dense, whole layers) exchange FL4Health's packed list as it is.

========  =====================================================  ============================================
method    request                                                response
========  =====================================================  ============================================
Config    (nothing)                                              the run's settings (:class:`DemoConfig`)
Submit    run, round, client, num_examples; arrays: the payload  (nothing): accepted
          (the selection)
Fetch     run, round                                             arrays: the payload of the aggregate, once
                                                                 every client has submitted that round
Report    run, round, client, accuracy, loss, train_loss,        (nothing): accepted
          bytes_sent, bytes_received (the payloads'),
          fl4health_list_bytes_sent, fl4health_list_bytes_received
          (the same selections as FL4Health's packed lists)
Progress  done (rounds the caller has seen complete)             done, total, and the last complete round's
                                                                 run, round and mean accuracy
========  =====================================================  ============================================

A refused call fails with a gRPC status and a message saying why (wrong round, duplicate client, ...).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

SERVICE = "paramsel.demo.v1.Coordinator"
CONFIG = "Config"
SUBMIT = "Submit"
FETCH = "Fetch"
REPORT = "Report"
PROGRESS = "Progress"
METHODS = (CONFIG, SUBMIT, FETCH, REPORT, PROGRESS)

ENV_COORDINATOR = "PARAMSEL_COORDINATOR"
"""Where ``paramsel demo-client`` finds the coordinator when ``--coordinator`` is not given."""

SPARSE_RUN = "sparse"
"""The run exchanging what the chosen criterion selects."""
DENSE_RUN = "dense"
"""The baseline: dense FedAvg, the whole model every round."""

COMPACT_PAYLOAD = "paramsel compact payload"
"""What a top-k run exchanges: values and Elias-Fano or bitmap positions (``push_compact``)."""
PACKED_LIST = "FL4Health packed list"
"""What the other runs exchange: FL4Health's packed list as it is."""

SCORE_CRITERIA = (
    "largest_magnitude_change",
    "smallest_magnitude_change",
    "largest_final_magnitude",
    "smallest_final_magnitude",
    "largest_increase_in_magnitude",
    "smallest_increase_in_magnitude",
)
"""Top-k criteria: SparseCooParameterExchanger with ``<name>_scores``; aggregated by aggregate_sparse_coo."""
LAYER_CRITERIA = ("layers_threshold", "layers_percentage")
"""Whole-layer criteria: DynamicLayerExchanger; aggregated by aggregate_layers."""
CRITERIA = SCORE_CRITERIA + LAYER_CRITERIA

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

Scalar = int | float | str


@dataclass
class Message:
    """Named fields (0-d arrays for scalars) and a list of arrays (e.g. an FL4Health packed list)."""

    fields: dict[str, np.ndarray] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def of(
        cls, fields: Mapping[str, Scalar | np.ndarray] | None = None, arrays: Sequence[Any] = ()
    ) -> Message:
        return cls({k: np.asarray(v) for k, v in (fields or {}).items()}, [np.asarray(a) for a in arrays])

    def _field(self, name: str) -> np.ndarray:
        try:
            value = self.fields[name]
        except KeyError:
            raise ValueError(f"the message has no field {name!r}") from None
        if value.ndim != 0:
            raise ValueError(f"field {name!r} must be a scalar, got shape {value.shape}")
        return value

    def get_int(self, name: str) -> int:
        value = self._field(name)
        if value.dtype.kind not in "iu":
            raise ValueError(f"field {name!r} must be an integer, got dtype {value.dtype}")
        return int(value)

    def get_float(self, name: str) -> float:
        value = self._field(name)
        if value.dtype.kind not in "iuf":
            raise ValueError(f"field {name!r} must be a number, got dtype {value.dtype}")
        return float(value)

    def get_str(self, name: str) -> str:
        value = self._field(name)
        if value.dtype.kind != "U":
            raise ValueError(f"field {name!r} must be a string, got dtype {value.dtype}")
        return str(value)


def encode(message: Message) -> bytes:
    """The field names (a unicode array), the number of arrays, the field values, then the arrays."""
    buffer = io.BytesIO()
    names = list(message.fields)
    records = [
        np.array(names, dtype=np.str_),
        np.array(len(message.arrays), dtype=np.int64),
        *(message.fields[n] for n in names),
        *message.arrays,
    ]
    for record in records:
        np.save(buffer, np.asarray(record), allow_pickle=False)
    return buffer.getvalue()


def decode(data: bytes) -> Message:
    """The message :func:`encode` wrote; ValueError for anything else (object arrays included)."""
    buffer = io.BytesIO(data)

    def record() -> np.ndarray:
        if buffer.tell() >= len(data):
            raise ValueError("the message ends early")
        return np.asarray(np.load(buffer, allow_pickle=False))

    names, count = record(), record()
    if names.ndim != 1 or (names.size and names.dtype.kind != "U") or count.ndim or count.dtype.kind != "i":
        raise ValueError("the message does not start with its field names and array count")
    fields = {str(name): record() for name in names.tolist()}
    arrays = [record() for _ in range(int(count))]
    if buffer.tell() != len(data):
        raise ValueError(f"{len(data) - buffer.tell()} bytes follow the message")
    return Message(fields, arrays)


def payload_bytes(arrays: Sequence[np.ndarray]) -> int:
    """What the demo counts as the bytes of a payload: the sum of ``nbytes`` over its arrays, i.e. the
    compact payload's length, or the FL4Health packed list's arrays (values, COO indices, shapes and
    the names array; or layers and names). The ``.npy`` framing of the message is not counted."""
    return sum(int(np.asarray(a).nbytes) for a in arrays)


def compact_arrays(payload: bytes) -> list[np.ndarray]:
    """A compact payload as the arrays of a message: one 1-d uint8 array of its bytes."""
    return [np.frombuffer(payload, dtype=np.uint8)]


def compact_payload(arrays: Sequence[np.ndarray]) -> bytes:
    """The compact payload :func:`compact_arrays` carried; ValueError for anything else."""
    if len(arrays) != 1 or np.asarray(arrays[0]).dtype != np.uint8 or np.asarray(arrays[0]).ndim != 1:
        shapes = ", ".join(f"{np.asarray(a).dtype} {np.asarray(a).shape}" for a in arrays)
        raise ValueError(f"a compact payload is one 1-d uint8 array, got [{shapes}]")
    return np.asarray(arrays[0]).tobytes()


@dataclass(frozen=True)
class DemoConfig:
    """The settings of a demo, held by the coordinator and fetched by every client (``Config``)."""

    clients: int = 3
    rounds: int = 10
    sparsity: float = 0.1
    criterion: str = "largest_magnitude_change"
    seed: int = 0
    dense_baseline: bool = True
    local_epochs: int = 3
    skew: float = 0.8
    norm_threshold: float = 0.005

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        if self.local_epochs < 1:
            raise ValueError(f"local epochs must be >= 1, got {self.local_epochs}")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew must be in [0, 1], got {self.skew}")
        if not self.norm_threshold > 0.0:
            raise ValueError(f"norm threshold must be > 0, got {self.norm_threshold}")

    @property
    def runs(self) -> tuple[str, ...]:
        """The runs, in the order every client carries them out."""
        return (SPARSE_RUN, DENSE_RUN) if self.dense_baseline else (SPARSE_RUN,)

    def layout(self, run: str) -> str:
        """``"sparse_coo"`` or ``"layers"``: the packed-list layout (and aggregation) of a run."""
        return "sparse_coo" if run == SPARSE_RUN and self.criterion in SCORE_CRITERIA else "layers"

    def compact(self, run: str) -> bool:
        """Whether ``run`` exchanges compact payloads (top-k runs) rather than FL4Health's packed lists."""
        return self.layout(run) == "sparse_coo"

    def payload(self, run: str) -> str:
        """What ``run``'s clients and coordinator exchange, for the figures."""
        return COMPACT_PAYLOAD if self.compact(run) else PACKED_LIST

    def describe(self, run: str) -> str:
        if run == DENSE_RUN:
            return "dense FedAvg (whole model)"
        if self.criterion == "layers_threshold":
            return f"layers_threshold (normalized drift > {self.norm_threshold:g})"
        if self.criterion == "layers_percentage":
            return f"layers_percentage ({self.sparsity:g} of the layers)"
        return f"{self.criterion} (sparsity {self.sparsity:g})"

    def to_message(self) -> Message:
        return Message.of(
            {
                "clients": self.clients,
                "rounds": self.rounds,
                "sparsity": float(self.sparsity),
                "criterion": self.criterion,
                "seed": self.seed,
                "dense_baseline": int(self.dense_baseline),
                "local_epochs": self.local_epochs,
                "skew": float(self.skew),
                "norm_threshold": float(self.norm_threshold),
            }
        )

    @classmethod
    def from_message(cls, message: Message) -> DemoConfig:
        return cls(
            clients=message.get_int("clients"),
            rounds=message.get_int("rounds"),
            sparsity=message.get_float("sparsity"),
            criterion=message.get_str("criterion"),
            seed=message.get_int("seed"),
            dense_baseline=bool(message.get_int("dense_baseline")),
            local_epochs=message.get_int("local_epochs"),
            skew=message.get_float("skew"),
            norm_threshold=message.get_float("norm_threshold"),
        )


@dataclass(frozen=True)
class ProgressInfo:
    done: int
    total: int
    run: str
    round: int
    accuracy: float


class CoordinatorStub:
    """The client side of the protocol, one Python call per method."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._calls = {
            method: self._channel.unary_unary(
                f"/{SERVICE}/{method}", request_serializer=encode, response_deserializer=decode
            )
            for method in METHODS
        }

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: str, message: Message, timeout: float, *, wait_for_ready: bool = False
    ) -> Message:
        reply = self._calls[method](message, timeout=timeout, wait_for_ready=wait_for_ready)
        assert isinstance(reply, Message)
        return reply

    def config(self, *, timeout: float = 60.0) -> DemoConfig:
        """The coordinator's settings; waits up to ``timeout`` for the coordinator to come up."""
        return DemoConfig.from_message(self._call(CONFIG, Message(), timeout, wait_for_ready=True))

    def submit(
        self, run: str, round_number: int, client: int, num_examples: int, payload: Sequence[np.ndarray]
    ) -> None:
        fields: dict[str, Scalar] = {
            "run": run,
            "round": round_number,
            "client": client,
            "num_examples": num_examples,
        }
        self._call(SUBMIT, Message.of(fields, payload), 60.0)

    def fetch(self, run: str, round_number: int, *, timeout: float = 600.0) -> list[np.ndarray]:
        return self._call(FETCH, Message.of({"run": run, "round": round_number}), timeout).arrays

    def report(
        self,
        run: str,
        round_number: int,
        client: int,
        *,
        accuracy: float,
        loss: float,
        train_loss: float,
        bytes_sent: int,
        bytes_received: int,
        fl4health_list_bytes_sent: int,
        fl4health_list_bytes_received: int,
    ) -> None:
        fields: dict[str, Scalar] = {
            "run": run,
            "round": round_number,
            "client": client,
            "accuracy": accuracy,
            "loss": loss,
            "train_loss": train_loss,
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
            "fl4health_list_bytes_sent": fl4health_list_bytes_sent,
            "fl4health_list_bytes_received": fl4health_list_bytes_received,
        }
        self._call(REPORT, Message.of(fields), 60.0)

    def progress(self, done: int, *, wait: float = 1.0) -> ProgressInfo:
        """Returns when more than ``done`` rounds are complete, or after about ``wait`` seconds."""
        reply = self._call(PROGRESS, Message.of({"done": done, "wait": wait}), wait + 10.0)
        return ProgressInfo(
            reply.get_int("done"),
            reply.get_int("total"),
            reply.get_str("run"),
            reply.get_int("round"),
            reply.get_float("accuracy"),
        )
