"""``paramsel-demo``: the demo's Flower App run on this machine as local processes, no Docker.

1. ``paramsel serve --port 0`` (unless ``$PARAMSEL_TARGET`` names a running service);
2. a Flower SuperLink in simulation mode (``flower-superlink --simulation``) on a free loopback port,
   with ``FLWR_HOME`` in a scratch folder and Flower's telemetry and update checks off;
3. ``flwr run`` of this app against it, ``num-supernodes`` ClientApps on Flower's Simulation Engine
   (Ray), the settings passed as the run config; a progress bar follows the ServerApp's
   ``progress.jsonl``;
4. the run's final status from ``flwr ls --format json`` (``flwr run --stream`` exits 0 even when the
   ServerApp fails): anything but ``finished:completed`` is a failure, and so is a missing figures file;
5. the table of the figures the ServerApp wrote, then every process it started is stopped.

With ``--superlink HOST:PORT`` it runs the app on Flower's Deployment Engine instead: a SuperLink that
is already running (with its SuperNodes and SuperExecs, e.g. docker-compose.yml's), so 1. and 2. are
skipped and ``$PARAMSEL_TARGET`` must name a service every node can reach. ``--out`` is then a folder
the ServerApp writes too (the same path on its machine: a shared volume).

With ``--compare`` the app runs :mod:`paramsel_demo.compare`'s eight exchanges for several seeds instead
of the demo's two runs (the progress bar then counts runs), and the table, ``compare.json`` and
``compare.png`` replace the demo's figures.

Every process's output goes to a log file under ``OUT/logs``. Exit status: 0 when the federation
completed, 1 when it failed, 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paramsel_demo.settings import CRITERIA, DemoSettings

if TYPE_CHECKING:
    from paramsel_demo.compare import CompareSettings

ENV_TARGET = "PARAMSEL_TARGET"
FIGURES_FILE = "figures.json"  # figures.FIGURES_FILE, without importing matplotlib's users here
PLOT_FILE = "accuracy_vs_bytes.png"
PROGRESS_FILE = "progress.jsonl"
COMPARE_FILES = ("compare.json", "compare.md", "compare.png")  # compare.COMPARE_FILE, _TABLE, _PLOT
CONNECTION = "paramsel-demo"
"""The name of the SuperLink connection in the scratch FLWR_HOME's config.toml."""
STARTUP_SECONDS = 120.0
_SERVE_ANNOUNCE = re.compile(r"paramsel serving on (\S+):(\d+)")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_DEFAULTS = DemoSettings()
DEMO_TIMEOUT = 600.0
COMPARE_TIMEOUT = 1800.0


class DemoError(Exception):
    """The demo cannot go on; the message says why and shows the culprit's last output."""


def app_dir() -> Path:
    """The Flower App's folder (its pyproject.toml): the parent of this package in a checkout."""
    return Path(__file__).resolve().parent.parent


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path.name}: no output)"
    return f"--- last lines of {path} ---\n" + "\n".join(text[-lines:])


def program(name: str, env: dict[str, str]) -> str:
    """The path of Flower's command ``name`` on the children's PATH (this environment's first)."""
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise DemoError(f"{name} is not installed here: pip install 'flwr[simulation]>=1.41,<1.42'")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """A process of the demo, its stdout and stderr in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, args: Sequence[str], env: dict[str, str], log: Path) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as stream:
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stopped with whatever it started
            )
        return cls(name, proc, log)

    def failed(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"{self.name} exited with {code}\n{_tail(self.log)}"

    def stop(self) -> None:
        """SIGTERM to its process group (the SuperLink's SuperExec and simulation too), then SIGKILL."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._signal(signal.SIGKILL)  # anything the process left behind in its group

    def _signal(self, signum: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)


def _stop_all(children: list[Child]) -> None:
    """Stops the processes in the reverse order of their start (the service last)."""
    for child in reversed(children):
        child.stop()


def _wait_for(what: str, ready: Any, child: Child, timeout: float = STARTUP_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        failure = child.failed()
        if failure:
            raise DemoError(failure)
        if time.monotonic() > deadline:
            raise DemoError(f"{what} not ready within {timeout:g} s\n{_tail(child.log)}")
        time.sleep(0.2)


def _start_serve(env: dict[str, str], logs: Path, children: list[Child]) -> Child:
    service = Child.start(
        "paramsel serve",
        [sys.executable, "-m", "paramsel.server.cli", "serve", "--host", "127.0.0.1", "--port", "0"],
        {**env, "PYTHONUNBUFFERED": "1"},
        logs / "paramsel-serve.log",
    )
    children.append(service)
    return service


def _serve_address(service: Child) -> str:
    def announced() -> str | None:
        match = _SERVE_ANNOUNCE.search(service.log.read_text(encoding="utf-8", errors="replace"))
        return f"{match.group(1)}:{match.group(2)}" if match else None

    address: str = _wait_for("paramsel serve", announced, service)
    return address


def _start_superlink(env: dict[str, str], logs: Path, children: list[Child]) -> tuple[Child, int]:
    port = _free_port()
    superlink = Child.start(
        "flower-superlink",
        [
            program("flower-superlink", env),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        env,
        logs / "superlink.log",
    )
    children.append(superlink)
    return superlink, port


def _wait_superlink(superlink: Child, port: int) -> None:
    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    _wait_for("the SuperLink", healthy, superlink)


def _flower_home(home: Path, address: str) -> None:
    """FLWR_HOME's config.toml: one SuperLink connection, the SuperLink at ``address``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n',
        encoding="utf-8",
    )


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for these characters


def _run_config(
    settings: DemoSettings, target: str, out: Path, path: Path, compare: CompareSettings | None = None
) -> Path:
    """The run config overrides, as a TOML file for ``flwr run --run-config`` (paths may hold spaces)."""
    base = settings.run_config() if compare is None else compare.run_config()
    entries = {**base, "paramsel-target": target, "out-dir": str(out)}
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in entries.items()), encoding="utf-8")
    return path


def _federation_config(settings: DemoSettings, workers: int) -> str:
    """The Simulation Engine's settings: a node per client, ``workers`` Ray workers of one CPU each running
    the ClientApps, Ray quiet."""
    return (
        f"num-supernodes={settings.clients} client-resources-num-cpus=1 init-args-num-cpus={workers} "
        'init-args-logging-level="ERROR" init-args-log-to-driver=false'
    )


def _flwr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("flwr", env), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def run_status(env: dict[str, str], run_id: int) -> tuple[str, str]:
    """(status, details) of run ``run_id`` from ``flwr ls --run-id --format json``."""
    done = _flwr(env, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
    try:
        answer = json.loads(done.stdout)
        run = answer["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown", f"flwr ls answered {done.returncode}: {done.stdout}{done.stderr}"


def _follow(run: Child, out: Path, total: int, deadline: float) -> None:
    """The progress bar, fed by the ServerApp's progress.jsonl, until ``flwr run --stream`` exits."""
    from tqdm import tqdm

    from paramsel_demo.figures import read_progress

    done = 0
    with tqdm(total=total, unit="round", desc="federated rounds") as bar:
        bar.set_postfix_str("starting the Simulation Engine")
        while run.proc.poll() is None:
            if time.monotonic() > deadline:
                raise DemoError(f"not finished in time ({done} of {total} rounds complete)\n{_tail(run.log)}")
            rounds = [r for r in read_progress(out) if r.get("event") == "round"]
            if len(rounds) > done:
                last = rounds[-1]
                bar.update(len(rounds) - done)
                done = len(rounds)
                bar.set_postfix_str(f"{last['run']} round {last['round']}: accuracy {last['accuracy']:.3f}")
            time.sleep(0.25)


def _follow_runs(run: Child, out: Path, total: int, deadline: float) -> None:
    """``--compare``'s progress bar, over the (exchange, seed) runs, fed by progress.jsonl."""
    from tqdm import tqdm

    from paramsel_demo.figures import read_progress

    done, seen = 0, 0
    with tqdm(total=total, unit="run", desc="comparison runs") as bar:
        bar.set_postfix_str("starting the Simulation Engine")
        while run.proc.poll() is None:
            if time.monotonic() > deadline:
                raise DemoError(f"not finished in time ({done} of {total} runs complete)\n{_tail(run.log)}")
            records = read_progress(out)
            if len(records) > seen:
                seen = len(records)
                finished = sum(1 for r in records if r.get("event") == "run")
                bar.update(finished - done)
                done = finished
                rounds = [r for r in records if r.get("event") == "round"]
                if rounds:
                    last = rounds[-1]
                    bar.set_postfix_str(
                        f"{last['label']}, seed {last['seed']}, round {last['round']}: "
                        f"accuracy {last['accuracy']:.3f}"
                    )
            time.sleep(0.25)


def run_demo(
    settings: DemoSettings,
    *,
    out: Path,
    timeout: float,
    app: Path,
    workers: int = 1,
    superlink: str | None = None,
    compare: CompareSettings | None = None,
) -> int:
    """The whole demo; 0 when the federation completed and the figures are written, else 1.
    ``superlink``: the address of a running SuperLink (Deployment Engine), instead of starting one.
    ``compare``: the comparison (``--compare``) instead of the demo's two runs."""
    started = time.monotonic()
    out = out.resolve()
    logs = out / "logs"
    outputs = (FIGURES_FILE, PLOT_FILE) if compare is None else COMPARE_FILES
    for stale in (*outputs, PROGRESS_FILE):
        (out / stale).unlink(missing_ok=True)
    bin_dir = Path(sys.executable).parent
    scratch = Path(tempfile.mkdtemp(prefix="paramsel-demo-"))
    env = {
        **os.environ,
        # The SuperLink starts its SuperExec and the simulation by name: this environment's first.
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(scratch / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(scratch / "ray"),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    children: list[Child] = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        stack.callback(_stop_all, children)
        try:
            # Both start at once: each takes seconds to import what it needs.
            given = os.environ.get(ENV_TARGET)
            service = None if given else _start_serve(env, logs, children)
            local = None if superlink else _start_superlink(env, logs, children)
            if service is None:
                target = str(given)
                print(f"using the paramsel service at {target} (${ENV_TARGET})", flush=True)
            else:
                target = _serve_address(service)
                print(f"paramsel serve is up at {target}", flush=True)
            if local is not None:
                _wait_superlink(*local)
                address = f"127.0.0.1:{local[1]}"
            else:
                address = str(superlink)
            _flower_home(scratch / "flwr", address)
            engine = "Deployment Engine" if superlink else "Simulation Engine"
            if compare is None:
                runs = ", ".join(settings.describe(r) for r in settings.runs)
            else:
                runs = (
                    f"{len(compare.runs)} (8 exchanges x seeds {', '.join(map(str, compare.seed_list))}), "
                    f"MLP 64-{compare.hidden_units}-10 ({compare.parameters:,} parameters)"
                )
            print(
                f"Flower SuperLink ({engine}) at {address}; {settings.clients} clients, "
                f"{settings.rounds} rounds, runs: {runs}",
                flush=True,
            )
            overrides = _run_config(settings, target, out, scratch / "run-config.toml", compare)
            run = Child.start(
                "flwr run",
                [
                    program("flwr", env),
                    "run",
                    str(app),
                    CONNECTION,
                    "--stream",
                    "--run-config",
                    str(overrides),
                    *([] if superlink else ["--federation-config", _federation_config(settings, workers)]),
                ],
                env,
                logs / "flwr-run.log",
            )
            children.append(run)
            if compare is None:
                _follow(run, out, settings.rounds * len(settings.runs), started + timeout)
            else:
                _follow_runs(run, out, len(compare.runs), started + timeout)
            match = _RUN_STARTED.search(run.log.read_text(encoding="utf-8", errors="replace"))
            if run.proc.returncode != 0 or match is None:
                raise DemoError(f"flwr run exited with {run.proc.returncode}\n{_tail(run.log)}")
            status, details = run_status(env, int(match.group(1)))
            if status != "finished:completed":
                raise DemoError(f"the Flower run ended {status}: {details or _tail(run.log)}")
            if not (out / outputs[0]).is_file():
                raise DemoError(
                    f"the ServerApp completed, but {out / outputs[0]} is missing\n{_tail(run.log)}"
                )
        except DemoError as failure:
            print(f"paramsel-demo failed: {failure}", file=sys.stderr, flush=True)
            print(f"logs: {logs}", file=sys.stderr, flush=True)
            return 1
    if compare is not None:
        print((out / COMPARE_FILES[1]).read_text(encoding="utf-8"), end="")
        for name, path in zip(("figures", "table", "plot"), COMPARE_FILES, strict=True):
            print(f"{name}: {out / path}")
        print(f"logs: {logs}")
        print(f"wall time: {time.monotonic() - started:.1f} s", flush=True)
        return 0
    from paramsel_demo.figures import format_table, summary

    figures = json.loads((out / FIGURES_FILE).read_text(encoding="utf-8"))
    print(format_table(figures))
    print(summary(figures))
    print(f"figures: {out / FIGURES_FILE}")
    print(f"plot: {out / PLOT_FILE}")
    print(f"logs: {logs}")
    print(f"wall time: {time.monotonic() - started:.1f} s", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paramsel-demo",
        description=(
            "A federated run through paramsel as a Flower App on this machine: paramsel serve (unless "
            "$PARAMSEL_TARGET names a service), a Flower SuperLink on the Simulation Engine and N "
            "ClientApps. Each client trains an MLP on a non-IID shard of scikit-learn's digits; every push "
            "and every aggregation of the sparse run goes through the paramsel service, beside a dense "
            "FedAvg run. Prints a table per round, writes figures.json and accuracy_vs_bytes.png to --out."
        ),
    )
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
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="directory for figures.json, accuracy_vs_bytes.png and logs/ (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"give up after this many seconds (default {DEMO_TIMEOUT:g}; {COMPARE_TIMEOUT:g} with --compare)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="instead of the demo's two runs, compare 8 exchanges on the same data: dense FedAvg, "
        "FL4Health's sparse values (top-k 0.1 and 0.01), sparse updates with error feedback (top-k 0.1 "
        "and 0.01, float32 and float16 values; seeded random-k 0.1), each for --seeds seeds, with a "
        "wider MLP; writes compare.json, compare.md and compare.png to --out. --criterion, --sparsity, "
        "--no-dense-baseline and --norm-threshold do not apply",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="--compare: seeds per exchange, --seed, --seed + 1, ... (model init and batch order; the data "
        "split is --seed's) (default %(default)s)",
    )
    parser.add_argument(
        "--hidden-units",
        type=int,
        default=256,
        help="--compare: hidden units of the MLP 64-H-10 (default %(default)s; the demo's is 32)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=0.05,
        help="--compare: SGD's step size, for every exchange (default %(default)s, the demo's)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Simulation Engine workers running ClientApps at once; each imports torch and the SDK "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help="run on this running SuperLink (Flower's Deployment Engine: its SuperNodes and SuperExecs "
        "started elsewhere) instead of starting one on the Simulation Engine; needs $PARAMSEL_TARGET",
    )
    parser.add_argument(
        "--app",
        type=Path,
        default=app_dir(),
        help="the Flower App's folder, holding its pyproject.toml (default %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = DemoSettings(
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
    except ValueError as error:
        print(f"paramsel-demo: {error}", file=sys.stderr)
        return 2
    compare = None
    if args.compare:
        fixed = {
            "--criterion": args.criterion != _DEFAULTS.criterion,
            "--sparsity": args.sparsity != _DEFAULTS.sparsity,
            "--no-dense-baseline": not args.dense_baseline,
            "--norm-threshold": args.norm_threshold != _DEFAULTS.norm_threshold,
        }
        given = [option for option, set_ in fixed.items() if set_]
        if given:
            print(
                f"paramsel-demo: --compare runs its own set of exchanges; {', '.join(given)} "
                "does not apply to it",
                file=sys.stderr,
            )
            return 2
        if args.superlink:
            print(
                "paramsel-demo: --compare runs on the Simulation Engine only (on the Deployment Engine "
                "every message starts a fresh ClientApp process: its 240 rounds would take hours)",
                file=sys.stderr,
            )
            return 2
        from paramsel_demo.compare import CompareSettings

        try:
            compare = CompareSettings(settings, args.seeds, args.hidden_units, args.learning_rate)
        except ValueError as error:
            print(f"paramsel-demo: {error}", file=sys.stderr)
            return 2
    if args.workers < 1:
        print(f"paramsel-demo: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if not (args.app / "pyproject.toml").is_file():
        print(
            f"paramsel-demo: {args.app} holds no pyproject.toml (pass the Flower App's folder with --app)",
            file=sys.stderr,
        )
        return 2
    if args.superlink and not os.environ.get(ENV_TARGET):
        print(
            f"paramsel-demo: --superlink needs ${ENV_TARGET}, a service every node reaches", file=sys.stderr
        )
        return 2
    try:
        timeout = args.timeout
        if timeout is None:
            timeout = DEMO_TIMEOUT if compare is None else COMPARE_TIMEOUT
        return run_demo(
            settings,
            out=args.out,
            timeout=timeout,
            app=args.app,
            workers=args.workers,
            superlink=args.superlink,
            compare=compare,
        )
    except KeyboardInterrupt:  # the processes it started are stopped by then
        print("paramsel-demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
