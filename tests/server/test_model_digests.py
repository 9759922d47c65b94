"""ModelDigest kinds: BLAKE3 and SHA-256 of one digest input, what each server accepts, and the SDK's choice.

Also that the SDK never reuses a digest computed for an earlier state of the initial model: it takes
one per call, so no way of changing a model (optimizer step, load_state_dict, ``.data`` writes, numpy
views) can make the server use a stale initial model.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from blake3 import blake3
from support import start_server
from torch import nn

from paramsel.client import (
    Client,
    ScoreFunction,
    SparseCooParameterExchanger,
    TopK,
    largest_magnitude_change_scores,
)
from paramsel.client import _client as client_module
from paramsel.server import calls as calls_module
from paramsel.server import info as info_module
from paramsel.server import models as models_module
from paramsel.server.app import RunningServer
from paramsel.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.digest import model_digest
from paramsel.wire.streams import read_frames, write_frames

MODEL = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
INITIAL = {"w": torch.tensor([1.0, 0.0, 3.5, 0.0])}  # |w - w0| = [0, 2, 0.5, 4]: top half is [1, 3]
TOP_HALF = TopK(0.5, ScoreFunction.LARGEST_MAGNITUDE_CHANGE)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningServer]:
    monkeypatch.setattr(client_module, "_digest_kinds", {})  # what the SDK learnt of earlier servers
    running = start_server()
    yield running
    running.stop(0)


def _select(target: str, initial: dict[str, torch.Tensor] | None, **digest: bytes) -> list[int]:
    """A Select built by hand, naming the initial model by the ModelDigest fields given."""
    start = service_pb2.SelectStart(
        criterion=TOP_HALF.to_proto(), position_encoding=tensor_pb2.POSITION_ENCODING_FLAT_INT64
    )
    if digest:
        start.initial_model_digest.CopyFrom(tensor_pb2.ModelDigest(**digest))
    sections = [(tensor_pb2.SECTION_MODEL, list(MODEL.items()))]
    if initial is not None:
        sections.append((tensor_pb2.SECTION_INITIAL_MODEL, list(initial.items())))
    frames = write_frames(service_pb2.SelectRequest, ("start", start), chunk_size=1 << 20, dense=sections)
    with grpc.insecure_channel(target) as channel:
        replies = service_pb2_grpc.ParameterSelectionServiceStub(channel).Select(frames, timeout=60)
        result = read_frames(
            replies, first="header", sparse_sections=frozenset({tensor_pb2.SECTION_RESULT}), max_bytes=1 << 20
        )
    positions: list[int] = result.sparse[tensor_pb2.SECTION_RESULT][0].positions.tolist()
    return positions


def _refusal(target: str, initial: dict[str, torch.Tensor] | None, **digest: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _select(target, initial, **digest)
    return err.value


# The digest input of {"fc.w": [[1.0, -2.0]] (float32), "n": 7 (int64, 0-d)}, written from the rule in
# tensor.proto's ModelDigest: per tensor, name length (uint32 LE), name, DataType (uint32 LE), number of
# dimensions (uint32 LE), dimensions (int64 LE), data (little-endian).
TINY = {"fc.w": torch.tensor([[1.0, -2.0]], dtype=torch.float32), "n": torch.tensor(7, dtype=torch.int64)}
TINY_INPUT = (
    b"\x04\x00\x00\x00" + b"fc.w" + b"\x01\x00\x00\x00"  # DATA_TYPE_FLOAT32 = 1
    b"\x02\x00\x00\x00"
    + b"\x01"
    + b"\x00" * 7
    + b"\x02"
    + b"\x00" * 7  # 2 dimensions: 1, 2
    + b"\x00\x00\x80\x3f"
    + b"\x00\x00\x00\xc0"  # 1.0f, -2.0f
    + b"\x01\x00\x00\x00"
    + b"n"
    + b"\x05\x00\x00\x00"  # DATA_TYPE_INT64 = 5
    + b"\x00\x00\x00\x00"  # 0 dimensions
    + b"\x07"
    + b"\x00" * 7  # 7
)


def test_both_kinds_hash_the_digest_input_written_by_hand() -> None:
    assert len(TINY_INPUT) == 4 + 4 + 4 + 4 + 16 + 8 + 4 + 1 + 4 + 4 + 8
    assert struct.pack("<I4sII2qffI1sIIq", 4, b"fc.w", 1, 2, 1, 2, 1.0, -2.0, 1, b"n", 5, 0, 7) == TINY_INPUT
    # BLAKE3 as the spec's default hash mode (the reference test vector of the empty input)...
    assert blake3(b"").hexdigest() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    # ...of the input built by hand, pinned once so that neither library nor framing can drift.
    expected = blake3(TINY_INPUT).digest()
    assert expected.hex() == "41e6d4b594b7ff8a8f4c51cfe68b16667be3dcc2f780dd546c426bd377b9c450"
    assert model_digest(TINY.items(), "blake3") == expected
    sha = hashlib.sha256(TINY_INPUT).digest()
    assert sha.hex() == "32b4c628869aa0e093e196f0a83e79b48e946d439212d87d8215070907450ae2"
    assert model_digest(TINY.items(), "sha256") == sha
    assert model_digest(TINY.items()) == hashlib.sha256(TINY_INPUT).digest()  # the default stays SHA-256
    # A large tensor goes through the multithreaded path: still the one-thread hash of the same bytes.
    big = {"x": torch.arange(1 << 20, dtype=torch.float32)}
    header = struct.pack("<I1sII1q", 1, b"x", 1, 1, 1 << 20)
    assert model_digest(big.items(), "blake3") == blake3(header + big["x"].numpy().tobytes()).digest()


def test_server_info_lists_both_kinds(fresh: RunningServer) -> None:
    info = Client(target=fresh.target).server_info()
    assert info.model_digests == ("sha256", "blake3")
    assert list(info.raw.model_digests) == ["sha256", "blake3"]


def test_a_sha256_only_client_still_works(fresh: RunningServer) -> None:
    """What a client older than the blake3 field sends: sha256 alone, refused, uploaded, then found."""
    sha = model_digest(INITIAL.items(), "sha256")
    refused = _refusal(fresh.target, None, sha256=sha)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not held" in (refused.details() or "")
    assert _select(fresh.target, INITIAL, sha256=sha) == [1, 3]
    assert _select(fresh.target, None, sha256=sha) == [1, 3]


def test_a_held_model_is_found_by_the_kind_it_was_kept_under(fresh: RunningServer) -> None:
    b3 = model_digest(INITIAL.items(), "blake3")
    sha = model_digest(INITIAL.items(), "sha256")
    assert _select(fresh.target, INITIAL, blake3=b3) == [1, 3]
    assert _select(fresh.target, None, blake3=b3) == [1, 3]
    refused = _refusal(fresh.target, None, sha256=sha)  # the same model, named by another kind
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "sha256" in (refused.details() or "")
    # A SHA-256 value that happens to equal a held BLAKE3 one names nothing.
    assert _refusal(fresh.target, None, sha256=b3).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_blake3_digest_that_does_not_match_the_data_is_refused_naming_it(fresh: RunningServer) -> None:
    wrong = model_digest(MODEL.items(), "blake3")
    refused = _refusal(fresh.target, INITIAL, blake3=wrong)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.details() or ""
    assert "initial_model_digest does not match" in details
    assert f"blake3: declared {wrong.hex()[:16]}" in details
    # Nothing was kept under the wrong digest.
    assert _refusal(fresh.target, None, blake3=wrong).code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sha256": b"\x01" * 32, "blake3": b"\x02" * 32}, "exactly one of sha256, blake3, got both"),
        ({}, "exactly one of sha256, blake3, got neither"),
        ({"blake3": b"\x01" * 31}, "initial_model_digest.blake3 must be 32 bytes, got 31"),
        ({"sha256": b"\x01" * 33}, "initial_model_digest.sha256 must be 32 bytes, got 33"),
    ],
)
def test_malformed_digests_are_refused(fresh: RunningServer, fields: dict[str, bytes], message: str) -> None:
    start = service_pb2.SelectStart(criterion=TOP_HALF.to_proto())
    start.initial_model_digest.SetInParent()  # present even when no field is set
    start.initial_model_digest.CopyFrom(tensor_pb2.ModelDigest(**fields))
    frames = write_frames(
        service_pb2.SelectRequest,
        ("start", start),
        chunk_size=1 << 20,
        dense=[(tensor_pb2.SECTION_MODEL, list(MODEL.items()))],
    )
    with grpc.insecure_channel(fresh.target) as channel, pytest.raises(grpc.RpcError) as err:
        list(service_pb2_grpc.ParameterSelectionServiceStub(channel).Select(frames, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


def _named_kinds(monkeypatch: pytest.MonkeyPatch, parse: Callable[[Any], Any] | None = None) -> list[str]:
    """Records the digest kind of every start the server reads (``parse`` replaces its reading)."""
    seen: list[str] = []
    real = parse or models_module.requested_digest

    def spy(start: Any) -> Any:
        digest = real(start)
        if digest is not None:
            seen.append(digest[0])
        return digest

    monkeypatch.setattr(models_module, "requested_digest", spy)
    monkeypatch.setattr(calls_module, "requested_digest", spy)
    return seen


def test_the_sdk_names_blake3_to_a_server_that_lists_it(
    fresh: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _named_kinds(monkeypatch)
    client = Client(target=fresh.target)
    assert client.select(TOP_HALF, MODEL, INITIAL).sparse[0].positions.tolist() == [1, 3]
    # Named (refused), uploaded with it (checked: early check, then resolve), then found by it.
    assert client.select(TOP_HALF, MODEL, INITIAL).sparse[0].positions.tolist() == [1, 3]
    assert set(seen) == {"blake3"}
    assert _select(fresh.target, None, blake3=model_digest(INITIAL.items(), "blake3")) == [1, 3]


def _old_requested_digest(start: Any) -> tuple[str, bytes] | None:
    """How a server older than the blake3 field reads a digest (0.1.0's code): sha256 alone."""
    if not start.HasField("initial_model_digest"):
        return None
    digest = bytes(start.initial_model_digest.sha256)
    if len(digest) != 32:
        raise WireError(f"start.initial_model_digest.sha256 must be 32 bytes, got {len(digest)}")
    return "sha256", digest


def test_an_old_server_refuses_a_blake3_digest_clearly(
    fresh: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _named_kinds(monkeypatch, _old_requested_digest)
    refused = _refusal(fresh.target, INITIAL, blake3=model_digest(INITIAL.items(), "blake3"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT  # never taken for another model
    assert "initial_model_digest.sha256 must be 32 bytes, got 0" in (refused.details() or "")


def test_the_sdk_switches_to_sha256_on_an_old_servers_refusal(
    fresh: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a server older than the blake3 field: its refusal, then SHA-256, remembered per channel."""
    monkeypatch.setattr(info_module, "DIGEST_KINDS", ())  # an old server lists no kinds...
    refusals = _old_server_refusals(monkeypatch)  # ...and reads sha256 alone
    client = Client(target=fresh.target)
    assert client.server_info().model_digests == ("sha256",)
    sent = _named_by_sdk(monkeypatch)
    assert client.select(TOP_HALF, MODEL, INITIAL).sparse[0].positions.tolist() == [1, 3]
    # blake3 (refused as 0.1.0 refuses it), sha256 (not held), sha256 with the upload.
    assert sent == ["blake3", "sha256", "sha256"]
    assert refusals == [0]
    assert client.select(TOP_HALF, MODEL, INITIAL).sparse[0].positions.tolist() == [1, 3]
    assert sent[3:] == ["sha256"]  # named by SHA-256 at once, and found


def _old_server_refusals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Makes the server read digests as 0.1.0 did; records the sha256 lengths it refused."""
    refused: list[int] = []

    def old(start: Any) -> tuple[str, bytes] | None:
        try:
            return _old_requested_digest(start)
        except WireError:
            refused.append(len(start.initial_model_digest.sha256))
            raise

    monkeypatch.setattr(models_module, "requested_digest", old)
    monkeypatch.setattr(calls_module, "requested_digest", old)
    return refused


def _named_by_sdk(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the ModelDigest field of every request the SDK builds that names one."""
    sent: list[str] = []
    real = write_frames  # the function client_module imported

    def spy(message: Any, start: tuple[str, Any], **kwargs: Any) -> Any:
        digest = start[1].initial_model_digest
        sent.extend(kind for kind in ("sha256", "blake3") if getattr(digest, kind))
        return real(message, start, **kwargs)

    monkeypatch.setattr(client_module, "write_frames", spy)
    return sent


def _set_weights(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor, how: str) -> None:
    """Writes new values into ``module``'s parameters in one of the ways FL clients do."""
    if how == "optimizer_step":
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        module.weight.grad = module.weight.detach() - weight
        module.bias.grad = module.bias.detach() - bias
        optimizer.step()
    elif how == "load_state_dict":
        module.load_state_dict({"weight": weight, "bias": bias})
    elif how == "in_place_no_grad":
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    elif how == "data_copy":  # .data has a version counter of its own: module.weight._version stays
        module.weight.data.copy_(weight)
        module.bias.data.copy_(bias)
    elif how == "data_assign":
        module.weight.data = weight.clone()
        module.bias.data = bias.clone()
    elif how == "numpy_view":  # no version counter at all sees this
        module.weight.detach().numpy()[...] = weight.numpy()
        module.bias.detach().numpy()[...] = bias.numpy()
    else:
        raise AssertionError(how)


MUTATIONS = [
    "optimizer_step",
    "load_state_dict",
    "in_place_no_grad",
    "data_copy",
    "data_assign",
    "numpy_view",
]


@pytest.mark.parametrize("how", MUTATIONS)
def test_a_changed_initial_model_is_never_named_by_its_old_digest(fresh: RunningServer, how: str) -> None:
    current = nn.Linear(4, 3)
    initial = nn.Linear(4, 3)
    with torch.no_grad():
        current.weight.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4))
        current.bias.copy_(torch.tensor([-1.0, 20.0, -3.0]))
        initial.weight.zero_()
        initial.bias.zero_()
    reusing = SparseCooParameterExchanger(0.25, largest_magnitude_change_scores, target=fresh.target)
    uploading = SparseCooParameterExchanger(
        0.25, largest_magnitude_change_scores, target=fresh.target, reuse_initial_model=False
    )
    before = reusing.push_parameters(current, initial)
    again = reusing.push_parameters(current, initial)  # named and found
    assert all(np.array_equal(a, b) for a, b in zip(before, again, strict=True))
    versions = [initial.weight._version, initial.bias._version]
    # The initial model becomes the current one on the largest entries: their change drops to 0.
    _set_weights(initial, current.weight.detach().clone(), torch.tensor([0.0, 20.0, 0.0]), how)
    if how in ("data_copy", "numpy_view"):  # the changes torch's version counters do not see
        assert [initial.weight._version, initial.bias._version] == versions
    after = reusing.push_parameters(current, initial)
    expected = uploading.push_parameters(current, initial)  # no digest: the initial model as it is now
    assert all(np.array_equal(a, b) for a, b in zip(after, expected, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
