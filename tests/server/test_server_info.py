"""GetServerInfo tells a client what the server speaks before it sends anything."""

from __future__ import annotations

from importlib import metadata

from paramsel.client import Client, DataType, PayloadKind, PositionEncoding, ScoreFunction
from paramsel.server.app import RunningServer
from paramsel.v1 import criteria_pb2


def test_server_info_describes_the_contract(server: RunningServer) -> None:
    info = Client(target=server.target).server_info()
    assert info.server_version == metadata.version("paramsel")
    assert info.api_package == "paramsel.v1"
    # Everything the contract defines is served: every value of each enum but *_UNSPECIFIED (the SDK's
    # enums mirror the proto's, tests/client/test_typed_surface.py checks that), every criterion.
    assert set(info.position_encodings) == set(PositionEncoding)
    assert set(info.data_types) == set(DataType)
    assert set(info.score_functions) == set(ScoreFunction)
    assert set(info.payload_kinds) == set(PayloadKind)
    assert DataType.BFLOAT16 in info.data_types
    assert ScoreFunction.SUPPLIED in info.score_functions
    criteria = criteria_pb2.Criterion.DESCRIPTOR.oneofs_by_name["kind"].fields
    assert list(info.criteria) == [field.name for field in criteria]
    assert "fed_pm" in info.criteria
    assert list(info.criteria) == ["top_k", "drift_threshold", "drift_percentage", "fed_pm", "sparse_update"]
    assert PositionEncoding.SEEDED in info.position_encodings
    assert info.max_chunk_size_bytes == 3 << 20
    assert info.max_call_bytes == server.config.max_call_bytes
    assert not info.requires_token


def test_server_info_needs_the_token_when_the_server_does() -> None:
    import pytest
    from support import start_server

    from paramsel.client import Connection, ParamselError, StatusCode

    guarded = start_server(tokens=("s3cret-token",))
    try:
        with pytest.raises(ParamselError) as err:
            Client(target=guarded.target).server_info()
        assert err.value.status is StatusCode.UNAUTHENTICATED
        info = Client(connection=Connection(guarded.target, token="s3cret-token")).server_info()
        assert info.requires_token
    finally:
        guarded.stop(0)
