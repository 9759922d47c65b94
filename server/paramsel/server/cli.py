"""The ``paramsel`` command."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from paramsel.server.app import serve
from paramsel.server.config import ServerConfig


def _parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="paramsel", description="Parameter selection as a service.")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve", help="run the gRPC service")
    s.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    s.add_argument(
        "--port", type=int, default=defaults.port, help="port; 0 picks a free one (default %(default)s)"
    )
    s.add_argument(
        "--chunk-size-bytes",
        type=int,
        default=defaults.chunk_size_bytes,
        help="tensor bytes per response message (default %(default)s)",
    )
    s.add_argument(
        "--max-call-bytes",
        type=int,
        default=defaults.max_call_bytes,
        help="largest tensor data one call may declare (default %(default)s)",
    )
    s.add_argument(
        "--max-workers", type=int, default=defaults.max_workers, help="threads (default %(default)s)"
    )
    s.add_argument(
        "--grace-seconds",
        type=float,
        default=defaults.grace_seconds,
        help="drain time on SIGTERM (default %(default)s)",
    )
    s.add_argument(
        "--model-cache-bytes",
        type=int,
        default=defaults.model_cache_bytes,
        help="initial models kept by digest for reuse; 0 keeps none (default %(default)s)",
    )
    s.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "serve":
        config = ServerConfig(
            host=args.host,
            port=args.port,
            chunk_size_bytes=args.chunk_size_bytes,
            max_call_bytes=args.max_call_bytes,
            max_workers=args.max_workers,
            grace_seconds=args.grace_seconds,
            model_cache_bytes=args.model_cache_bytes,
        )
        serve(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
