"""GetServerInfo tells a client what the server speaks before it sends anything."""

from __future__ import annotations

from importlib import metadata

from paramsel.client import Client
from paramsel.server.app import RunningServer
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2


def test_server_info_describes_the_contract(server: RunningServer) -> None:
    info = Client(target=server.target).server_info()
    assert info.server_version == metadata.version("paramsel")
    assert info.api_package == "paramsel.v1"
    assert set(info.position_encodings) == {
        tensor_pb2.POSITION_ENCODING_COO_INT64,
        tensor_pb2.POSITION_ENCODING_FLAT_INT64,
        tensor_pb2.POSITION_ENCODING_BITMAP,
        tensor_pb2.POSITION_ENCODING_ELIAS_FANO,
        tensor_pb2.POSITION_ENCODING_COMPACT,
    }
    assert len(info.data_types) == 10
    assert tensor_pb2.DATA_TYPE_BFLOAT16 in info.data_types
    assert len(info.score_functions) == 6
    assert criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE in info.score_functions
    assert list(info.criteria) == ["top_k", "drift_threshold", "drift_percentage", "fed_pm"]
    assert set(info.payload_kinds) == {
        service_pb2.PAYLOAD_KIND_SPARSE_COO,
        service_pb2.PAYLOAD_KIND_LAYERS,
        service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES,
    }
    assert info.max_chunk_size_bytes == 3 << 20
    assert info.max_call_bytes == server.config.max_call_bytes
    assert not info.requires_token


def test_server_info_needs_the_token_when_the_server_does() -> None:
    import pytest

    from paramsel.client import Connection, ParamselError, StatusCode
    from paramsel.server import ServerConfig, create_server

    guarded = create_server(ServerConfig(port=0, tokens=("s3cret-token",)))
    try:
        with pytest.raises(ParamselError) as err:
            Client(target=guarded.target).server_info()
        assert err.value.status is StatusCode.UNAUTHENTICATED
        info = Client(connection=Connection(guarded.target, token="s3cret-token")).server_info()
        assert info.requires_token
    finally:
        guarded.stop(0)
