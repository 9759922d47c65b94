"""The ``paramsel`` command."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from paramsel.demo.cli import register as register_demo
from paramsel.server.app import serve
from paramsel.server.config import ServerConfig
from paramsel.server.health_check import DEFAULT_TIMEOUT_SECONDS, default_target, run_health


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
    s.set_defaults(run=_serve)
    h = commands.add_parser(
        "health", help="ask a server's grpc.health.v1 service whether it is SERVING (exit 0) or not (exit 1)"
    )
    h.add_argument(
        "--target",
        default=default_target(),
        help="host:port of the server (default $PARAMSEL_TARGET, else 127.0.0.1:50051; here %(default)s)",
    )
    h.add_argument("--service", default="", help='service to check (default "": the server as a whole)')
    h.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="seconds to wait for the answer (default %(default)s)",
    )
    h.set_defaults(run=_health)
    register_demo(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _health(args: argparse.Namespace) -> int:
    return run_health(args.target, args.service, args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """Each subcommand sets ``run``: a function of the parsed arguments returning the exit code."""
    args = _parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
