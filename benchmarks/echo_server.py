"""The transport floor: a bare gRPC server that takes a stream of raw byte chunks and answers their count.

``python -m benchmarks.echo_server`` prints ``echo serving on HOST:PORT`` and serves until terminated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc
import torch

SERVICE = "bench.Echo"
METHOD = "Count"
CHUNK_BYTES = 1 << 20


def _count(chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return sum(len(chunk) for chunk in chunks).to_bytes(8, "little")


def main() -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.stream_unary_rpc_method_handler(_count)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def _chunks(tensors: Iterable[torch.Tensor], size: int) -> Iterator[bytes]:
    for tensor in tensors:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        for offset in range(0, raw.size, size):
            yield raw[offset : offset + size].tobytes()


def stream_once(channel: grpc.Channel, tensors: list[torch.Tensor], size: int = CHUNK_BYTES) -> float:
    """Seconds to stream the tensors' bytes in ``size`` chunks and get the one-message reply."""
    call = channel.stream_unary(f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=None)
    expected = sum(t.nbytes for t in tensors)
    start = time.perf_counter()
    reply = call(_chunks(tensors, size))
    seconds = time.perf_counter() - start
    if int.from_bytes(reply, "little") != expected:
        raise RuntimeError(f"echo counted {int.from_bytes(reply, 'little')} bytes, sent {expected}")
    return seconds


if __name__ == "__main__":
    main()
