"""The ``paramsel`` command.

The container's HEALTHCHECK runs ``paramsel health`` every few seconds, so this module imports
no torch: the server, and torch with it, loads only when ``serve`` runs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence

from paramsel.server.config import Limits, ServerConfig
from paramsel.server.health_check import DEFAULT_TIMEOUT_SECONDS, default_target, run_health
from paramsel.server.memory import allocator_environment
from paramsel.server.security import TOKENS_ENV, ConfigError, load_tokens

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
        default=defaults.limits.max_call_bytes,
        help="bytes one call may make the server hold: its upload and what is computed from it (default %(default)s = 8 GiB)",
    )
    s.add_argument(
        "--max-workers",
        type=int,
        default=defaults.max_workers,
        help="threads serving calls; must be above --max-concurrent-calls (default %(default)s)",
    )
    s.add_argument(
        "--grace-seconds",
        type=_non_negative_seconds,
        default=defaults.grace_seconds,
        help="drain time on SIGTERM (default %(default)s)",
    )
    s.add_argument(
        "--idle-release-seconds",
        type=_non_negative_seconds,
        default=defaults.idle_release_seconds,
        help="give free memory back to the system once no call has run for this long; until then the "
        "next call reuses it (default %(default)s)",
    )
    s.add_argument(
        "--progress-timeout-seconds",
        type=_positive_seconds,
        default=defaults.progress_timeout_seconds,
        help="end a call that waits longer than this on its client, for its next request frame or for it "
        "to take the next response frame, with DEADLINE_EXCEEDED (default %(default)s)",
    )
    s.add_argument(
        "--max-calls-per-peer",
        type=int,
        default=defaults.max_calls_per_peer,
        help="calls one client address may have running at once; more are refused with "
        "RESOURCE_EXHAUSTED (default: no cap; behind a proxy or NAT all clients share one address)",
    )
    s.add_argument(
        "--model-cache-bytes",
        type=int,
        default=defaults.model_cache_bytes,
        help="initial models kept by digest for reuse; 0 keeps none (default %(default)s)",
    )
    s.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="logging level, in any case (default %(default)s)",
    )
    _add_limits(s, defaults)
    _add_security(s)
    s.set_defaults(run=_serve, usage=s.format_usage)
    h = commands.add_parser(
        "health",
        help="ask a server's grpc.health.v1 service whether it is SERVING (exit 0) or not (exit 1)",
        allow_abbrev=False,
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
    _add_health_tls(h)
    h.set_defaults(run=_health, usage=h.format_usage)
    return parser


def _add_health_tls(h: argparse.ArgumentParser) -> None:
    """The SDK's Connection settings, with its environment variables as defaults."""
    h.add_argument(
        "--ca-file", metavar="PATH", help="PEM CA bundle of the server: TLS (default $PARAMSEL_CA_FILE)"
    )
    h.add_argument(
        "--cert-file",
        metavar="PATH",
        help="PEM client certificate for mutual TLS (default $PARAMSEL_CERT_FILE)",
    )
    h.add_argument("--key-file", metavar="PATH", help="PEM key of --cert-file (default $PARAMSEL_KEY_FILE)")
    h.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force TLS on (default roots unless a CA is given) or off (default: on iff a file is set)",
    )
    h.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name the server's certificate must carry, when not the target's host "
        "(default $PARAMSEL_TLS_SERVER_NAME)",
    )
    h.add_argument(
        "--token-file",
        metavar="PATH",
        help="bearer token to send (health needs none); default $PARAMSEL_TOKEN, else $PARAMSEL_TOKEN_FILE",
    )


def _add_limits(s: argparse.ArgumentParser, defaults: ServerConfig) -> None:
    """The defaults (config.Limits) suit 2 cores and 24 GiB: 16 calls at once, 12 GiB in flight among them."""
    s.add_argument(
        "--max-concurrent-calls",
        type=int,
        default=defaults.limits.max_concurrent_calls,
        help="paramsel calls running at once; more are refused with RESOURCE_EXHAUSTED, not queued; "
        "must be below --max-workers (default %(default)s)",
    )
    s.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=defaults.limits.max_inflight_bytes,
        help="the same bytes of all running calls together (default %(default)s = 12 GiB)",
    )
    s.add_argument(
        "--max-tensors-per-call",
        type=int,
        default=defaults.limits.max_tensors_per_call,
        help="tensors one call may declare (default %(default)s)",
    )
    s.add_argument(
        "--max-elements-per-tensor",
        type=int,
        default=defaults.limits.max_elements_per_tensor,
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
        max_workers=args.max_workers,
        grace_seconds=args.grace_seconds,
        idle_release_seconds=args.idle_release_seconds,
        progress_timeout_seconds=args.progress_timeout_seconds,
        max_calls_per_peer=args.max_calls_per_peer,
        model_cache_bytes=args.model_cache_bytes,
        limits=Limits(
            max_concurrent_calls=args.max_concurrent_calls,
            max_inflight_bytes=args.max_inflight_bytes,
            max_call_bytes=args.max_call_bytes,
            max_tensors_per_call=args.max_tensors_per_call,
            max_elements_per_tensor=args.max_elements_per_tensor,
        ),
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        tokens=load_tokens(args.token_file),
        reflection=args.reflection or not args.production,
        metrics_port=args.metrics_port,
    )


def _serve(args: argparse.Namespace) -> int:
    """Settings that cannot be used (out of range, contradictory, files unreadable) are usage errors:
    the usage line and the reason on stderr, exit 2, as argparse does for a malformed flag. A server that
    cannot listen where it was told exits 1."""

    def usage_error(err: Exception) -> int:
        print(f"{args.usage()}paramsel serve: error: {err}", file=sys.stderr)
        return 2

    try:
        config = config_from_args(args)
    except ValueError as err:  # ConfigError too
        return usage_error(err)
    if args.own_process:
        _restart_with_allocator_tunables()
    from paramsel.server.app import serve  # torch with it: only once the settings are known to be usable

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.production and not config.tokens and config.tls_client_ca_file is None:
        logging.getLogger("paramsel.server").warning(
            "--production without --token-file, $%s or --tls-client-ca: any client may call", TOKENS_ENV
        )
    try:
        serve(config)
    except ConfigError as err:  # a TLS file that cannot be read or is not PEM
        return usage_error(err)
    except OSError as err:  # the address cannot be bound
        print(f"paramsel serve: error: {err}", file=sys.stderr)
        return 1
    return 0


def _restart_with_allocator_tunables() -> None:
    """Runs this command again, in place (same pid), with glibc's malloc tuned for the server (see
    :mod:`paramsel.server.memory`): tunables are read only when a process starts. Returns when there is
    nothing to add (the second time round, or not glibc)."""
    environment = allocator_environment(os.environ)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_seconds(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _health(args: argparse.Namespace) -> int:
    from paramsel.client._connection import Connection  # seam: the probe takes the SDK's TLS settings

    try:
        connection = Connection(
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            tls=args.tls,
            token_file=args.token_file,
        )
    except ValueError as err:  # contradictory TLS flags
        print(f"{args.usage()}paramsel health: error: {err}", file=sys.stderr)
        return 2
    return run_health(
        args.target, args.service, args.timeout, connection=connection, server_name=args.tls_server_name
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Each subcommand sets ``run``: a function of the parsed arguments returning the exit code."""
    args = _parser().parse_args(argv)
    # From the command line, ``serve`` owns its process and may restart it with other settings; called
    # with arguments (from Python), it runs in the caller's process as it is.
    args.own_process = argv is None
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
