"""The ``paramsel`` command.

The container's HEALTHCHECK runs ``paramsel health`` every few seconds, so this module imports
no torch: the server, and torch with it, loads only when ``serve`` runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from paramsel.demo.cli import register as register_demo
from paramsel.server.config import ServerConfig
from paramsel.server.health_check import DEFAULT_TIMEOUT_SECONDS, default_target, run_health
from paramsel.server.security import TOKENS_ENV, ConfigError, load_tokens


def _parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="paramsel", description="Parameter selection as a service.")
    commands = parser.add_subparsers(dest="command", required=True)
    # No abbreviations: "--token SECRET" must not be taken for "--token-file SECRET".
    s = commands.add_parser("serve", help="run the gRPC service", allow_abbrev=False)
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
    _add_limits(s, defaults)
    _add_security(s)
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


def _add_limits(s: argparse.ArgumentParser, defaults: ServerConfig) -> None:
    """Sized for 2 cores and 24 GiB: four calls at once, 12 GiB of declared tensor data among them."""
    s.add_argument(
        "--max-concurrent-calls",
        type=int,
        default=defaults.max_concurrent_calls,
        help="paramsel calls running at once; more are refused with RESOURCE_EXHAUSTED, not queued; "
        "keep it below --max-workers (default %(default)s)",
    )
    s.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=defaults.max_inflight_bytes,
        help="tensor bytes declared by all running calls together (default %(default)s = 12 GiB)",
    )
    s.add_argument(
        "--max-tensors-per-call",
        type=int,
        default=defaults.max_tensors_per_call,
        help="tensors one call may declare (default %(default)s)",
    )
    s.add_argument(
        "--max-elements-per-tensor",
        type=int,
        default=defaults.max_elements_per_tensor,
        help="elements of one declared tensor (default %(default)s = 2**31)",
    )


def _add_security(s: argparse.ArgumentParser) -> None:
    s.add_argument("--tls-cert", metavar="PATH", help="PEM certificate chain: serve TLS (needs --tls-key)")
    s.add_argument("--tls-key", metavar="PATH", help="PEM private key of --tls-cert")
    s.add_argument(
        "--tls-client-ca",
        metavar="PATH",
        help="PEM CA bundle: require client certificates it signed (mutual TLS)",
    )
    s.add_argument(
        "--token-file",
        metavar="PATH",
        help="bearer tokens accepted on paramsel calls, one a line, '#' comments; "
        f"${TOKENS_ENV} (comma-separated) adds more. Without either, no token is needed",
    )
    s.add_argument(
        "--production",
        action="store_true",
        help="production defaults: gRPC reflection off (unless --reflection)",
    )
    s.add_argument(
        "--reflection",
        action="store_true",
        help="serve gRPC reflection even with --production (it is on by default otherwise)",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port, on the --host address; 0 picks one (default: off)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server settings ``paramsel serve`` runs with; raises ValueError (ConfigError) for unusable ones."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        chunk_size_bytes=args.chunk_size_bytes,
        max_call_bytes=args.max_call_bytes,
        max_workers=args.max_workers,
        grace_seconds=args.grace_seconds,
        model_cache_bytes=args.model_cache_bytes,
        max_concurrent_calls=args.max_concurrent_calls,
        max_inflight_bytes=args.max_inflight_bytes,
        max_tensors_per_call=args.max_tensors_per_call,
        max_elements_per_tensor=args.max_elements_per_tensor,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        tokens=load_tokens(args.token_file),
        reflection=args.reflection or not args.production,
        metrics_port=args.metrics_port,
    )


def _serve(args: argparse.Namespace) -> int:
    from paramsel.server.app import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
        if args.production and not config.tokens and config.tls_client_ca_file is None:
            logging.getLogger("paramsel.server").warning(
                "--production without --token-file, $%s or --tls-client-ca: any client may call", TOKENS_ENV
            )
        serve(config)
    except (ConfigError, ValueError) as err:
        print(f"paramsel serve: error: {err}", file=sys.stderr)
        return 2
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
