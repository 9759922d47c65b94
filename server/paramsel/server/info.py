"""GetServerInfo: what this server is and speaks, derived from the code that serves it."""

from __future__ import annotations

from importlib import metadata

from paramsel.server.config import ServerConfig
from paramsel.server.criteria import SERVED_SCORE_FUNCTIONS
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2
from paramsel.wire import DTYPES, MAX_CHUNK_SIZE_BYTES
from paramsel.wire.digest import DIGEST_KINDS


def _version() -> str:
    try:
        return metadata.version("paramsel")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def server_info(config: ServerConfig) -> service_pb2.GetServerInfoResponse:
    encodings = [
        v for v in tensor_pb2.PositionEncoding.values() if v != tensor_pb2.POSITION_ENCODING_UNSPECIFIED
    ]
    kinds = [v for v in service_pb2.PayloadKind.values() if v != service_pb2.PAYLOAD_KIND_UNSPECIFIED]
    return service_pb2.GetServerInfoResponse(
        server_version=_version(),
        api_package=service_pb2.DESCRIPTOR.package,
        position_encodings=encodings,
        data_types=sorted(DTYPES),  # type: ignore[arg-type]
        score_functions=sorted(SERVED_SCORE_FUNCTIONS),  # type: ignore[arg-type]
        criteria=[field.name for field in criteria_pb2.Criterion.DESCRIPTOR.oneofs_by_name["kind"].fields],
        payload_kinds=kinds,
        max_chunk_size_bytes=MAX_CHUNK_SIZE_BYTES,
        max_call_bytes=config.limits.max_call_bytes,
        requires_token=bool(config.tokens),
        model_digests=list(DIGEST_KINDS),
    )
