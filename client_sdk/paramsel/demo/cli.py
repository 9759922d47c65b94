"""The demo's subcommands of ``paramsel``: ``demo``, ``demo-coordinator`` and ``demo-client``.

Imported by ``paramsel.server.cli`` on every start, so this module imports nothing heavy: torch,
scikit-learn and matplotlib load only when a demo subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from paramsel.demo.protocol import CRITERIA, ENV_COORDINATOR, DemoConfig

_DEFAULTS = DemoConfig()
DEFAULT_COORDINATOR_PORT = 50052


def register(commands: Any) -> None:
    """Adds ``demo``, ``demo-coordinator`` and ``demo-client`` to the ``paramsel`` command."""
    demo = commands.add_parser(
        "demo",
        help="a real federated training run through the service (service, coordinator, clients)",
        description=(
            "Runs a complete federated training on this machine: `paramsel serve` (unless "
            "$PARAMSEL_TARGET names a service), a coordinator and N clients, as processes talking over "
            "loopback gRPC. Each client trains an MLP on a non-IID shard of scikit-learn's digits; every "
            "push and every aggregation goes through the paramsel service. Prints a table per round, "
            "writes figures.json and accuracy_vs_bytes.png to --out."
        ),
    )
    _run_options(demo, clients=True)
    _out_option(demo)
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds (default %(default)s)"
    )
    demo.set_defaults(run=_demo)

    coordinator = commands.add_parser(
        "demo-coordinator",
        help="the demo's coordinator on its own (aggregates through the service)",
        description=(
            "Serves the demo's coordinator: collects the clients' packed lists per round, aggregates "
            "them through the paramsel service (--target, else $PARAMSEL_TARGET, else an embedded one), "
            "hands the aggregate back; when every round is in, prints the table and writes the outputs."
        ),
    )
    coordinator.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    coordinator.add_argument(
        "--port",
        type=int,
        default=DEFAULT_COORDINATOR_PORT,
        help="port; 0 picks a free one (default %(default)s)",
    )
    _run_options(coordinator, clients=True)
    _target_option(coordinator)
    _out_option(coordinator)
    coordinator.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="exit with an error if the clients have not finished after this many seconds "
        "(default %(default)s)",
    )
    coordinator.set_defaults(run=_coordinator)

    client = commands.add_parser(
        "demo-client",
        help="one demo client on its own (its settings come from the coordinator)",
        description="Runs demo client --index of --clients against the coordinator; the run's settings "
        "(rounds, criterion, seed, ...) come from the coordinator.",
    )
    client.add_argument("--index", type=int, required=True, help="this client's index, 0 to clients - 1")
    client.add_argument("--clients", type=int, required=True, help="how many clients the demo has")
    client.add_argument(
        "--coordinator",
        default=os.environ.get(ENV_COORDINATOR),
        help=f"the coordinator's HOST:PORT (default ${ENV_COORDINATOR})",
    )
    _target_option(client)
    client.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the coordinator to come up (default %(default)s)",
    )
    client.set_defaults(run=_client)


def _run_options(parser: argparse.ArgumentParser, *, clients: bool) -> None:
    if clients:
        parser.add_argument(
            "--clients", type=int, default=_DEFAULTS.clients, help="number of clients (default %(default)s)"
        )
    parser.add_argument(
        "--rounds", type=int, default=_DEFAULTS.rounds, help="federated rounds (default %(default)s)"
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        default=_DEFAULTS.sparsity,
        help="share of the parameters (top-k criteria) or of the layers (layers_percentage) sent per "
        "round (default %(default)s)",
    )
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default=_DEFAULTS.criterion,
        help="what the sparse run exchanges: a score function (top-k parameters) or layers_threshold / "
        "layers_percentage (whole layers by drift) (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed (default %(default)s)")
    parser.add_argument(
        "--dense-baseline",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.dense_baseline,
        help="also run dense FedAvg (the whole model every round) for comparison (default on)",
    )
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=_DEFAULTS.local_epochs,
        help="epochs of local training per round (default %(default)s)",
    )
    parser.add_argument(
        "--skew",
        type=float,
        default=_DEFAULTS.skew,
        help="share of each digit's examples on its home client (digit %% clients); the rest is spread "
        "over the others (default %(default)s)",
    )
    parser.add_argument(
        "--norm-threshold",
        type=float,
        default=_DEFAULTS.norm_threshold,
        help="normalized drift threshold of layers_threshold (default %(default)s)",
    )


def _out_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="directory for figures.json and accuracy_vs_bytes.png (default %(default)s)",
    )


def _target_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=None,
        help="the paramsel service's HOST:PORT (default $PARAMSEL_TARGET, else one embedded in the process)",
    )


def _config(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        clients=args.clients,
        rounds=args.rounds,
        sparsity=args.sparsity,
        criterion=args.criterion,
        seed=args.seed,
        dense_baseline=args.dense_baseline,
        local_epochs=args.local_epochs,
        skew=args.skew,
        norm_threshold=args.norm_threshold,
    )


def _missing_extra(command: str) -> bool:
    """True (and says how to fix it) when the demo's own dependencies are not installed."""
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"paramsel {command}: needs {' and '.join(missing)}; install the demo extra: pip install 'paramsel[demo]'",
            file=sys.stderr,
        )
    return bool(missing)


def _checked_config(args: argparse.Namespace, command: str) -> DemoConfig | None:
    try:
        return _config(args)
    except ValueError as error:
        print(f"paramsel {command}: {error}", file=sys.stderr)
        return None


def _demo(args: argparse.Namespace) -> int:
    from paramsel.demo.runner import run_demo

    config = _checked_config(args, "demo")
    if config is None or _missing_extra("demo"):
        return 2
    try:
        return run_demo(config, out=args.out, timeout=args.timeout)
    except KeyboardInterrupt:  # the processes it started are stopped by then
        print("paramsel demo: interrupted", file=sys.stderr)
        return 130


def _coordinator(args: argparse.Namespace) -> int:
    from paramsel.demo.coordinator import run_coordinator

    config = _checked_config(args, "demo-coordinator")
    if config is None or _missing_extra("demo-coordinator"):
        return 2
    return run_coordinator(
        config, host=args.host, port=args.port, target=args.target, out=args.out, timeout=args.timeout
    )


def _client(args: argparse.Namespace) -> int:
    import grpc

    from paramsel.client import ParamselError
    from paramsel.demo.client import run_client

    if not args.coordinator:
        print(f"paramsel demo-client: --coordinator or ${ENV_COORDINATOR} is required", file=sys.stderr)
        return 2
    if _missing_extra("demo-client"):
        return 2
    try:
        run_client(
            args.index,
            args.clients,
            args.coordinator,
            target=args.target,
            connect_timeout=args.connect_timeout,
        )
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        print(
            f"paramsel demo-client {args.index}: the coordinator refused a call: {code}: {details}",
            file=sys.stderr,
        )
        return 1
    except ParamselError as error:
        print(f"paramsel demo-client {args.index}: the paramsel service failed: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"paramsel demo-client {args.index}: {error}", file=sys.stderr)
        return 1
    return 0
