"""The checks of scripts/compose_ci.sh, against a running ``docker compose`` project.

What to expect of each service is read from the compose file (``docker compose config --format json``),
not written here: the label ``paramsel.ci.role`` is ``job`` for a service that runs to its end and must
exit 0 (the run is over when every job has), ``service`` (the default) for one that must stay up, be
healthy when it has a health check, and exit 0 when compose stops it. The project is the one
``docker compose`` finds by itself: COMPOSE_FILE and COMPOSE_PROJECT_NAME in the environment.

    compose_check.py versions                 the engine and Compose against the file's x-requires
    compose_check.py wait [--timeout S]       until every job exited 0; fails at the first that did not,
                                              or when a service exits or turns unhealthy
    compose_check.py stopped                  after `docker compose stop`: every container exited 0
    compose_check.py figures DIR              the demo's figures.json and PNG in DIR are there and sane
    compose_check.py break KIND IN OUT        a deliberately broken copy of a resolved config (self-test)

Exit status: 0 when the check holds, 1 when it does not (the reason on stderr), 2 for bad usage.
Standard library only: it runs with any Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLE_LABEL = "paramsel.ci.role"
JOB = "job"
SERVICE = "service"
FIGURES_FILE = "figures.json"
PLOT_FILE = "accuracy_vs_bytes.png"
DENSE_RUN = "dense"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BREAKS = ("job-fails", "no-output")


class CheckError(Exception):
    """The check does not hold; the message says why."""


@dataclass(frozen=True)
class Expectation:
    """What one service of the compose file must do."""

    role: str
    healthcheck: bool


def expectations(config: Mapping[str, Any]) -> dict[str, Expectation]:
    """Per service of a resolved compose config: its role (label, default `service`) and whether it has
    a health check (one of its own, not disabled; an image's HEALTHCHECK counts only through `ps`)."""
    found = {}
    for name, service in config.get("services", {}).items():
        labels = service.get("labels") or {}
        if isinstance(labels, list):  # the file's list form, ["key=value"]
            labels = dict(item.partition("=")[::2] for item in labels)
        role = labels.get(ROLE_LABEL, SERVICE)
        if role not in (JOB, SERVICE):
            raise CheckError(f"{name}: label {ROLE_LABEL}={role!r}; expected {JOB!r} or {SERVICE!r}")
        check = service.get("healthcheck") or {}
        healthcheck = bool(check.get("test")) and not check.get("disable", False)
        found[name] = Expectation(role, healthcheck)
    if not any(e.role == JOB for e in found.values()):
        raise CheckError(f"no service is labelled {ROLE_LABEL}={JOB}: nothing tells when the run is over")
    return found


def parse_ps(text: str) -> list[dict[str, Any]]:
    """`docker compose ps --format json`: one JSON object per line (Compose >= 2.21) or one array."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        loaded: list[dict[str, Any]] = json.loads(text)
        return loaded
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Progress:
    """What `wait` has seen so far across polls."""

    healthy: set[str] = field(default_factory=set)
    reported: dict[str, str] = field(default_factory=dict)


def _describe(container: Mapping[str, Any]) -> str:
    state = str(container.get("State", "?"))
    if state == "exited":
        state += f" {container.get('ExitCode')}"
    health = container.get("Health") or ""
    return f"{state} ({health})" if health else state


def assess(
    wanted: Mapping[str, Expectation], containers: Sequence[Mapping[str, Any]], progress: Progress
) -> bool:
    """One poll: True when every job has exited 0; raises CheckError at the first broken promise."""
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for container in containers:
        by_service.setdefault(str(container.get("Service")), []).append(container)
    unknown = set(by_service) - set(wanted)
    if unknown:
        raise CheckError(f"containers of services the compose file does not have: {sorted(unknown)}")
    done = True
    for name, expectation in wanted.items():
        mine = by_service.get(name, [])
        if not mine:
            done = False
            continue
        for container in mine:
            state = container.get("State")
            health = container.get("Health") or ""
            if expectation.role == JOB:
                if state == "exited":
                    if container.get("ExitCode") != 0:
                        raise CheckError(f"{container.get('Name')}: job exited {container.get('ExitCode')}")
                elif state == "dead":
                    raise CheckError(f"{container.get('Name')}: job is dead")
                else:
                    done = False
            else:
                if state != "running":
                    raise CheckError(
                        f"{container.get('Name')}: service is {_describe(container)} while the jobs run"
                    )
                if health == "unhealthy":
                    raise CheckError(f"{container.get('Name')}: service turned unhealthy")
                if health == "healthy":
                    progress.healthy.add(name)
    if done:
        never = [n for n, e in wanted.items() if e.healthcheck and n not in progress.healthy]
        if never:
            raise CheckError(f"every job exited 0, but {never} never showed healthy")
    return done


def assess_stopped(containers: Sequence[Mapping[str, Any]]) -> None:
    """After `docker compose stop`: every container exited, and with 0 (services drain on SIGTERM)."""
    if not containers:
        raise CheckError("no containers: was the project started?")
    bad = [
        f"{c.get('Name')}: {_describe(c)}"
        for c in containers
        if c.get("State") != "exited" or c.get("ExitCode") != 0
    ]
    if bad:
        raise CheckError("not every container exited 0: " + "; ".join(bad))


# ---------------------------------------------------------------------------------------------- docker


def _docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise CheckError(f"docker {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def compose_config() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(_docker("compose", "config", "--format", "json"))
    return loaded


def compose_ps() -> list[dict[str, Any]]:
    return parse_ps(_docker("compose", "ps", "--all", "--format", "json"))


def _version(text: str) -> tuple[int, ...]:
    match = re.match(r"v?(\d+(?:\.\d+)*)", text.strip())
    if not match:
        raise CheckError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def at_least(found: str, minimum: str) -> bool:
    """`found` (26.1.5+dfsg1, v2.40.3) is `minimum` (25.0, 2.20.2) or newer."""
    have, need = _version(found), _version(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def check_versions(requires: Mapping[str, str], engine: str, compose: str) -> str:
    if not requires.get("engine") or not requires.get("compose"):
        raise CheckError("the compose file has no x-requires: {engine, compose}")
    for what, found in (("engine", engine), ("compose", compose)):
        if not at_least(found, requires[what]):
            raise CheckError(
                f"Docker {what} {found} is older than the {requires[what]} the compose file needs"
            )
    return f"engine {engine} >= {requires['engine']}, compose {compose} >= {requires['compose']}"


def _logs(name: str, lines: int = 40) -> str:
    result = subprocess.run(
        ["docker", "logs", "--tail", str(lines), name], capture_output=True, text=True, check=False
    )
    return result.stdout + result.stderr


def wait(timeout: float, poll: float = 3.0) -> None:
    wanted = expectations(compose_config())
    progress = Progress()
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    while True:
        containers = compose_ps()
        for container in containers:
            name, now = str(container.get("Name")), _describe(container)
            if progress.reported.get(name) != now:
                progress.reported[name] = now
                print(f"[{time.monotonic() - start:6.1f} s] {name}: {now}", flush=True)
        try:
            if assess(wanted, containers, progress):
                return
        except CheckError as failed:
            for container in containers:
                if container.get("State") != "running" or container.get("Health") == "unhealthy":
                    print(f"--- last lines of {container.get('Name')} ---", file=sys.stderr)
                    print(_logs(str(container.get("Name"))), file=sys.stderr)
            raise failed
        if time.monotonic() > deadline:
            jobs = [n for n, e in wanted.items() if e.role == JOB]
            raise CheckError(f"the jobs {jobs} did not all finish within {timeout:g} s")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------- figures


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise CheckError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckError(f"{what}: {value!r} is not a finite number")
    return float(value)


def check_figures(figures: Mapping[str, Any], *, min_accuracy: float) -> str:
    """The demo's figures: every run has every round, accuracies in [0, 1] ending at or above
    ``min_accuracy``, bytes that grow round after round, and the sparse runs exchanging fewer bytes than
    dense FedAvg."""
    runs = figures.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise CheckError("figures.json has no runs")
    counts = {name: len(run.get("rounds") or []) for name, run in runs.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise CheckError(f"runs have different or no rounds: {counts}")
    rounds = next(iter(counts.values()))
    config = figures.get("config") or {}
    for key in ("rounds", "num_server_rounds", "num-server-rounds"):
        if key in config and config[key] != rounds:
            raise CheckError(f"config {key}={config[key]} but {rounds} rounds recorded")
    finals = {}
    for name, run in runs.items():
        previous = 0.0
        for index, record in enumerate(run["rounds"], start=1):
            where = f"{name} round {index}"
            if record.get("round", index) != index:
                raise CheckError(f"{where}: numbered {record.get('round')}")
            accuracy = _number(record.get("accuracy"), f"{where} accuracy")
            if not 0.0 <= accuracy <= 1.0:
                raise CheckError(f"{where}: accuracy {accuracy}")
            _number(record.get("loss"), f"{where} loss")
            cumulative = _number(record.get("cumulative_bytes"), f"{where} cumulative_bytes")
            if cumulative <= previous:
                raise CheckError(f"{where}: cumulative bytes {cumulative} after {previous}")
            previous = cumulative
        finals[name] = (run["rounds"][-1]["accuracy"], previous)
        if finals[name][0] < min_accuracy:
            raise CheckError(f"{name}: final accuracy {finals[name][0]:.4f} < {min_accuracy}")
    if DENSE_RUN in finals:
        for name, (_, total) in finals.items():
            if name != DENSE_RUN and total >= finals[DENSE_RUN][1]:
                raise CheckError(
                    f"{name} exchanged {total:,.0f} B, not fewer than dense ({finals[DENSE_RUN][1]:,.0f})"
                )
    return f"{rounds} rounds; " + "; ".join(
        f"{name}: accuracy {acc:.4f}, {total:,.0f} B per client" for name, (acc, total) in finals.items()
    )


def check_outputs(out: Path, *, min_accuracy: float) -> str:
    figures_path, plot_path = out / FIGURES_FILE, out / PLOT_FILE
    if not figures_path.is_file():
        raise CheckError(f"{figures_path} is missing")
    if not plot_path.is_file():
        raise CheckError(f"{plot_path} is missing")
    try:
        figures = json.loads(figures_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckError(f"{figures_path}: {error}") from error
    summary = check_figures(figures, min_accuracy=min_accuracy)
    width, height = png_size(plot_path.read_bytes())
    if width < 200 or height < 150:
        raise CheckError(f"{plot_path}: {width}x{height} is too small for the plot")
    return f"{summary}; {PLOT_FILE} {width}x{height}"


# ---------------------------------------------------------------------------------------------- break


def broken(config: Mapping[str, Any], kind: str, *, out: str | None = None) -> dict[str, Any]:
    """A deliberately broken copy of a resolved config, for the self-test of these checks.

    job-fails: the first job (by name; today's only one, the demo) exits 1 at once. no-output: no service mounts ``out``, the
    outputs' host folder, and a run has 2 rounds (`--rounds`), so that it is over soon."""
    copy: dict[str, Any] = json.loads(json.dumps(config))
    copy.pop("name", None)
    services = copy["services"]
    if kind == "job-fails":
        jobs = sorted(n for n, e in expectations(copy).items() if e.role == JOB)
        victim = services[jobs[0]]
        victim["entrypoint"] = [
            "/bin/sh",
            "-c",
            "echo 'compose_ci self-test: this job fails on purpose' >&2; exit 1",
        ]
        victim["command"] = None
    elif kind == "no-output":
        if not out:
            raise CheckError("no-output needs the outputs' host folder")
        removed = 0
        for service in services.values():
            volumes = service.get("volumes") or []
            kept = [v for v in volumes if not (isinstance(v, dict) and v.get("source") == out)]
            removed += len(volumes) - len(kept)
            service["volumes"] = kept
            command = service.get("command")
            if isinstance(command, list) and "--rounds" in command:
                command[command.index("--rounds") + 1] = "2"
        if not removed:
            raise CheckError(f"no service mounts {out}")
    else:
        raise CheckError(f"unknown break {kind!r}; one of {BREAKS}")
    return copy


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("versions")
    waiting = commands.add_parser("wait")
    waiting.add_argument("--timeout", type=float, default=900.0, help="seconds (default %(default)s)")
    waiting.add_argument(
        "--poll", type=float, default=3.0, help="seconds between polls (default %(default)s)"
    )
    commands.add_parser("stopped")
    figures = commands.add_parser("figures")
    figures.add_argument("out", type=Path)
    figures.add_argument("--min-accuracy", type=float, default=0.5)
    breaking = commands.add_parser("break")
    breaking.add_argument("kind", choices=BREAKS)
    breaking.add_argument("config", type=Path)
    breaking.add_argument("output", type=Path)
    breaking.add_argument("--out", help="the outputs' host folder (no-output)")
    args = parser.parse_args(argv)
    try:
        if args.command == "versions":
            engine = _docker("version", "--format", "{{.Server.Version}}").strip()
            compose = _docker("compose", "version", "--short").strip()
            print(check_versions(compose_config().get("x-requires") or {}, engine, compose))
        elif args.command == "wait":
            wait(args.timeout, args.poll)
            print("every job exited 0; every service with a health check was healthy and stayed up")
        elif args.command == "stopped":
            containers = compose_ps()
            assess_stopped(containers)
            print(f"every container exited 0: {', '.join(sorted(str(c.get('Name')) for c in containers))}")
        elif args.command == "figures":
            print(check_outputs(args.out, min_accuracy=args.min_accuracy))
        elif args.command == "break":
            config = json.loads(args.config.read_text(encoding="utf-8"))
            args.output.write_text(json.dumps(broken(config, args.kind, out=args.out), indent=2) + "\n")
    except CheckError as failed:
        print(f"compose_check {args.command}: FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
