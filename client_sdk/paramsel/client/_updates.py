"""Sparse updates with error feedback, beyond FL4Health: the client's side of :class:`SparseUpdate`.

A client sends entries of its update u = (w - w0) + r instead of entries of its model, and carries in r
what it did not send (Stich et al. 2018; Lin et al. 2018): nothing is lost, only delayed. The aggregator
averages each coordinate over the clients that sent it (:func:`aggregate_updates`), and every client
adds that average to the model the round started from (:meth:`SparseUpdateExchanger.pull_compact`). The
server keeps nothing between calls: the residual lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from paramsel.client import _embedded
from paramsel.client._client import Client, SelectResult, SparseTensor, read_selection, sparse_tensors
from paramsel.client._compact import compact_payload
from paramsel.client._connection import Connection
from paramsel.client._errors import invalid_argument, local_errors
from paramsel.client._state import state_of
from paramsel.client._types import Averaging, PayloadKind, SparseUpdate, UpdateSelection, coerce_enum
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES
from paramsel.wire.fastframes import ChunkFrame

_SELECTIONS = {"top_k": UpdateSelection.TOP_K, "random_k": UpdateSelection.RANDOM_K}
_LOSSY_DTYPES = (torch.float16, torch.bfloat16)


def _selection(value: object) -> UpdateSelection:
    if isinstance(value, str):
        try:
            return _SELECTIONS[value]
        except KeyError:
            raise invalid_argument(f"selection must be 'top_k' or 'random_k', got {value!r}") from None
    return coerce_enum(UpdateSelection, value, "selection", unspecified=UpdateSelection.TOP_K)


def next_residual(
    model: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor],
    sent: Iterable[SparseTensor],
) -> dict[str, torch.Tensor]:
    """The residual after a round: u = (w - w0) + r (in each tensor's dtype, as the server computes it),
    minus what was sent, read back as the receiver reads it (each value cast to the tensor's dtype), at
    the positions sent; u everywhere else."""
    out: dict[str, torch.Tensor] = {}
    for name, current in model.items():
        update = current - initial[name]
        carried = residual.get(name)
        out[name] = update + carried if carried is not None else update
    for tensor in sent:  # the service's answers carry flat positions
        flat = out[tensor.name].view(-1)
        flat[tensor.positions] = flat[tensor.positions] - tensor.values.to(flat.dtype)
    return out


class SparseUpdateExchanger:
    """A client's exchange of sparse updates with error feedback (:class:`SparseUpdate`), beyond FL4Health.

    Each round: :meth:`push_compact` (or :meth:`select`) sends the selected entries of
    u = (w - w0) + residual, and keeps as the new residual what was not sent (and, with a lossy
    ``value_dtype``, what rounding took off what was); the aggregator averages the clients' payloads with
    :func:`aggregate_updates`; :meth:`pull_compact` adds that average to the model. ``initial_model`` is
    the model the round started from, the same for every client.

    ``selection``: ``"top_k"`` (the k = ceil(N x sparsity_level) entries of largest |u|) or
    ``"random_k"`` (per tensor, positions drawn from the ``seed`` every client of a round passes; no
    position bytes travel). ``value_dtype`` (torch.float16 or torch.bfloat16) halves the values' bytes;
    error feedback carries the rounding into the next round. Calls go to ``target=``/``connection=`` as
    the drop-in exchangers' do.
    """

    def __init__(
        self,
        sparsity_level: float,
        *,
        selection: str | UpdateSelection = "top_k",
        value_dtype: torch.dtype | None = None,
        exact_k: bool = False,
        target: str | None = None,
        connection: Connection | None = None,
        reuse_initial_model: bool = True,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
    ) -> None:
        if not 0 < sparsity_level <= 1:  # as the service refuses it: INVALID_ARGUMENT (a ValueError)
            raise invalid_argument(f"sparsity_level must be in (0, 1], got {sparsity_level}")
        if value_dtype is not None and value_dtype not in _LOSSY_DTYPES:
            raise invalid_argument(
                f"value_dtype must be torch.float16, torch.bfloat16 or None, got {value_dtype}"
            )
        self.sparsity_level = float(sparsity_level)
        self.selection = _selection(selection)
        self.value_dtype = value_dtype
        self.exact_k = bool(exact_k)
        self.reuse_initial_model = reuse_initial_model
        self.residual: dict[str, torch.Tensor] = {}
        """What earlier rounds did not send, per tensor (empty before the first round)."""
        self.client = Client(target=target, connection=connection, chunk_size_bytes=chunk_size_bytes)

    def criterion(self, seed: int = 0) -> SparseUpdate:
        """The criterion of a round (``seed``: random-k's, shared by the round's clients)."""
        return SparseUpdate(self.sparsity_level, self.selection, self.exact_k, seed)

    def select(self, model: nn.Module, initial_model: nn.Module, *, seed: int = 0) -> SelectResult:
        """This round's selection (frames kept); the residual moves on only once it has succeeded."""
        state = state_of(model)
        initial = state_of(initial_model)
        result = self.client.select(
            self.criterion(seed),
            state,
            initial,
            value_dtype=self.value_dtype,
            reuse_initial=self.reuse_initial_model,
            keep_frames=True,
            residual=self.residual or None,
        )
        with local_errors("the selection does not fit the model: "):
            self.residual = next_residual(state, initial, self.residual, result.sparse)
        return result

    def push_compact(self, model: nn.Module, initial_model: nn.Module, *, seed: int = 0) -> bytes:
        """This round's selection as a compact payload (SelectionPayload) for the aggregator."""
        return compact_payload(self.select(model, initial_model, seed=seed).frames or [])

    def pull_compact(self, payload: bytes, model: nn.Module) -> None:
        """Adds an averaged update (:func:`aggregate_updates`'s payload) to the model, in place."""
        sparse = decode_update(payload)
        with local_errors():
            _embedded.pull_sparse_into(
                model.state_dict(),
                [(s.name, s.shape, s.values, s.positions) for s in sparse],
                mode="add",
            )


def decode_update(payload: bytes) -> list[SparseTensor]:
    """The sparse tensors of a compact payload, with flat positions (and their seed, when seeded)."""
    with local_errors("not a paramsel compact payload: "):
        got = read_selection(service_pb2.SelectionPayload.FromString(payload).frames)
    if got.dense.get(tensor_pb2.SECTION_RESULT):
        raise invalid_argument("not a sparse update: the payload holds whole tensors")
    return sparse_tensors(got.sparse.get(tensor_pb2.SECTION_RESULT, []))


def aggregate_updates(
    results: Sequence[tuple[bytes, int]],
    *,
    weighted: bool = True,
    value_dtype: torch.dtype | None = None,
    target: str | None = None,
    connection: Connection | None = None,
) -> bytes:
    """The per-coordinate average (``Averaging.PER_COORDINATE``) of clients' compact update payloads,
    each with its example count, as a compact payload for :meth:`SparseUpdateExchanger.pull_compact`.

    Each coordinate is averaged over the clients that sent it; positions travel compactly both ways
    (seeded ones stay seeded). ``value_dtype`` rounds the average's values (torch.float16 or
    torch.bfloat16)."""
    contributions: list[tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseTensor]]] = []
    for i, (payload, num_examples) in enumerate(results):
        with local_errors(f"results[{i}]: "):
            contributions.append((num_examples, [], decode_update(payload)))
    answer = Client(target=target, connection=connection).aggregate(
        PayloadKind.SPARSE_COO,
        contributions,
        weighted=weighted,
        averaging=Averaging.PER_COORDINATE,
        value_dtype=value_dtype,
        keep_frames=True,
    )
    sent = sum(t.values.numel() for t in answer.sparse)
    return compact_payload(_selection_frames(answer.frames or [], sent))


def _selection_frames(frames: Sequence[Any], sent: int) -> list[Any]:
    """An Aggregate answer's frames as a Select answer's (the manifests and chunks are the same fields
    of both messages), under a SPARSE_UPDATE header."""
    out: list[Any] = []
    for frame in frames:
        if isinstance(frame, ChunkFrame):
            out.append(frame)  # AggregateResponse.chunk and SelectResponse.chunk are the same field
        elif frame.WhichOneof("frame") == "header":
            out.append(
                service_pb2.SelectResponse(
                    header=service_pb2.SelectionHeader(
                        kind=service_pb2.SELECTION_KIND_SPARSE_UPDATE,
                        top_k=service_pb2.TopKSummary(sent_entries=sent, selected_entries=sent),
                    )
                )
            )
        elif frame.WhichOneof("frame") == "sparse_tensors":
            out.append(service_pb2.SelectResponse(sparse_tensors=frame.sparse_tensors))
        else:
            raise invalid_argument(
                f"an aggregate of updates holds sparse tensors only, got a {frame.WhichOneof('frame')} frame"
            )
    return out
