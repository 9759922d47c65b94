"""GetServerInfo tells a client what the server speaks before it sends anything."""

from __future__ import annotations

from importlib import metadata

from paramsel.client import Client, DataType, PayloadKind, PositionEncoding, ScoreFunction
from paramsel.server.app import RunningServer


def test_server_info_describes_the_contract(server: RunningServer) -> None:
    info = Client(target=server.target).server_info()
    assert info.server_version == metadata.version("paramsel")
    assert info.api_package == "paramsel.v1"
    assert set(info.position_encodings) == {
        PositionEncoding.COO_INT64,
        PositionEncoding.FLAT_INT64,
        PositionEncoding.BITMAP,
        PositionEncoding.ELIAS_FANO,
        PositionEncoding.COMPACT,
    }
    assert len(info.data_types) == 10
    assert DataType.BFLOAT16 in info.data_types
    assert len(info.score_functions) == 6
    assert ScoreFunction.LARGEST_MAGNITUDE_CHANGE in info.score_functions
    assert list(info.criteria) == ["top_k", "drift_threshold", "drift_percentage", "fed_pm"]
    assert set(info.payload_kinds) == {
        PayloadKind.SPARSE_COO,
        PayloadKind.LAYERS,
        PayloadKind.FEDPM_PROBABILITIES,
    }
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
