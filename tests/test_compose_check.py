"""scripts/compose_check.py, the checks `make compose-demo` runs against a compose project, without an
engine: its verdicts on containers' states, figures and versions, and its command line against a
stand-in `docker` that answers `compose config` and a scripted series of `compose ps`.

The same checks against a real engine, and on deliberately broken copies of the compose file, run in
scripts/compose_ci.sh (its self-test step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compose_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cc = _load()


def _compose_file() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe").load(ROOT / "docker-compose.yml")
    return loaded


def _container(service: str, state: str = "running", exit_code: int = 0, health: str = "") -> dict[str, Any]:
    return {
        "Name": f"p-{service}-1",
        "Service": service,
        "State": state,
        "ExitCode": exit_code,
        "Health": health,
    }


def _running(**overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """A container per service of the compose file, each running, healthy when it has a health check."""
    containers = {
        name: _container(name, health="healthy" if cc.expectations(_compose_file())[name].healthcheck else "")
        for name in _compose_file()["services"]
    }
    containers.update(overrides)
    return list(containers.values())


def test_roles_come_from_the_compose_files_labels() -> None:
    wanted = cc.expectations(_compose_file())
    assert {name: (e.role, e.healthcheck) for name, e in wanted.items()} == {
        "paramsel": ("service", True),
        "superlink": ("service", True),
        "superexec-serverapp": ("service", False),
        **{f"supernode-{i}": ("service", True) for i in range(3)},
        **{f"superexec-{i}": ("service", False) for i in range(3)},
        "demo": ("job", False),
    }


def test_a_file_without_jobs_or_with_an_unknown_role_is_refused() -> None:
    with pytest.raises(cc.CheckError, match="nothing tells when the run is over"):
        cc.expectations({"services": {"a": {"image": "x"}}})
    with pytest.raises(cc.CheckError, match="expected 'job' or 'service'"):
        cc.expectations({"services": {"a": {"labels": ["paramsel.ci.role=batch"]}}})


def test_the_run_is_over_when_every_job_exited_0() -> None:
    wanted = cc.expectations(_compose_file())
    progress = cc.Progress()
    assert not cc.assess(wanted, _running(), progress)
    assert progress.healthy == {"paramsel", "superlink", "supernode-0", "supernode-1", "supernode-2"}
    assert cc.assess(wanted, _running(demo=_container("demo", "exited")), progress)


def test_with_several_jobs_the_run_is_over_when_the_last_one_exited_0() -> None:
    job = {"labels": {"paramsel.ci.role": "job"}}
    services = {"paramsel": _compose_file()["services"]["paramsel"], "a": job, "b": job}
    wanted = cc.expectations({"services": services})
    progress = cc.Progress()
    serve = _container("paramsel", health="healthy")
    a_done = [serve, _container("a", "exited"), _container("b")]
    assert not cc.assess(wanted, a_done, progress)
    assert cc.assess(wanted, [serve, _container("a", "exited"), _container("b", "exited")], progress)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"demo": _container("demo", "exited", 1)}, "p-demo-1: job exited 1"),
        ({"demo": _container("demo", "exited", 2)}, "job exited 2"),
        ({"demo": _container("demo", "dead", 137)}, "job is dead"),
        ({"paramsel": _container("paramsel", "exited", 0)}, "service is exited 0 while the jobs run"),
        ({"paramsel": _container("paramsel", health="unhealthy")}, "turned unhealthy"),
    ],
)
def test_a_broken_promise_fails_at_once(override: dict[str, Any], reason: str) -> None:
    with pytest.raises(cc.CheckError, match=reason):
        cc.assess(cc.expectations(_compose_file()), _running(**override), cc.Progress())


def test_a_service_that_never_showed_healthy_fails_the_run() -> None:
    finished = {"demo": _container("demo", "exited")}
    starting = _container("paramsel", health="starting")
    with pytest.raises(cc.CheckError, match=r"never showed healthy"):
        cc.assess(cc.expectations(_compose_file()), _running(**finished, paramsel=starting), cc.Progress())


def test_after_stop_every_container_must_have_exited_0() -> None:
    stopped = [_container(name, "exited") for name in ("paramsel", "demo")]
    cc.assess_stopped(stopped)
    with pytest.raises(cc.CheckError, match="p-paramsel-1: exited 137"):
        cc.assess_stopped([_container("paramsel", "exited", 137), _container("demo", "exited")])
    with pytest.raises(cc.CheckError, match="no containers"):
        cc.assess_stopped([])


def test_ps_output_as_lines_or_as_one_array() -> None:
    rows = [_container("a"), _container("b")]
    assert cc.parse_ps("\n".join(json.dumps(r) for r in rows) + "\n") == rows
    assert cc.parse_ps(json.dumps(rows)) == rows
    assert cc.parse_ps("") == []


@pytest.mark.parametrize(
    ("found", "minimum", "ok"),
    [
        ("26.1.5+dfsg1", "25.0", True),
        ("25.0.0", "25.0", True),
        ("20.10.24+dfsg1", "25.0", False),
        ("2.40.3", "2.20.2", True),
        ("v2.20.2", "2.20.2", True),
        ("2.18.1", "2.20.2", False),
        ("1.29.2", "2.20.2", False),
    ],
)
def test_versions_against_the_minimum(found: str, minimum: str, ok: bool) -> None:
    assert cc.at_least(found, minimum) is ok


def test_versions_are_checked_against_x_requires() -> None:
    requires = _compose_file()["x-requires"]
    assert "engine 26.1.5+dfsg1 >= 25.0" in cc.check_versions(requires, "26.1.5+dfsg1", "2.40.3")
    with pytest.raises(cc.CheckError, match=r"engine 20.10.24 is older than the 25.0"):
        cc.check_versions(requires, "20.10.24", "2.40.3")
    with pytest.raises(cc.CheckError, match="no x-requires"):
        cc.check_versions({}, "26.1.5", "2.40.3")


def _figures(rounds: int = 3, sparse_bytes: float = 100.0, final_accuracy: float = 0.9) -> dict[str, Any]:
    def run(per_round: float, last: float) -> dict[str, Any]:
        return {
            "initial": {"accuracy": 0.1, "loss": 2.3},
            "rounds": [
                {
                    "round": r,
                    "accuracy": last if r == rounds else 0.5,
                    "loss": 1.0,
                    "cumulative_bytes": per_round * r,
                }
                for r in range(1, rounds + 1)
            ],
        }

    return {
        "config": {"rounds": rounds},
        "runs": {"sparse": run(sparse_bytes, final_accuracy), "dense": run(1000.0, 0.95)},
    }


def _png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    signature: bytes = cc.PNG_SIGNATURE
    return signature + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(header))


def test_sane_figures_and_plot_pass(tmp_path: Path) -> None:
    (tmp_path / "figures.json").write_text(json.dumps(_figures()))
    (tmp_path / "accuracy_vs_bytes.png").write_bytes(_png(825, 528))
    summary = cc.check_outputs(tmp_path, min_accuracy=0.5)
    assert summary.startswith("3 rounds; sparse: accuracy 0.9000")
    assert "accuracy_vs_bytes.png 825x528" in summary


@pytest.mark.parametrize(
    ("figures", "reason"),
    [
        ({"runs": {}}, "no runs"),
        ({**_figures(), "config": {"rounds": 10}}, "config rounds=10 but 3 rounds recorded"),
        (_figures(final_accuracy=0.2), "final accuracy 0.2000 < 0.5"),
        (_figures(final_accuracy=1.5), "accuracy 1.5"),
        (_figures(sparse_bytes=2000.0), "not fewer than dense"),
        (_figures(sparse_bytes=0.0), "cumulative bytes 0.0 after 0.0"),
    ],
)
def test_figures_that_are_not_sane_fail(figures: dict[str, Any], reason: str) -> None:
    with pytest.raises(cc.CheckError, match=reason):
        cc.check_figures(figures, min_accuracy=0.5)


def test_missing_outputs_fail(tmp_path: Path) -> None:
    with pytest.raises(cc.CheckError, match=r"figures\.json is missing"):
        cc.check_outputs(tmp_path, min_accuracy=0.5)
    (tmp_path / "figures.json").write_text(json.dumps(_figures()))
    with pytest.raises(cc.CheckError, match=r"accuracy_vs_bytes\.png is missing"):
        cc.check_outputs(tmp_path, min_accuracy=0.5)
    (tmp_path / "accuracy_vs_bytes.png").write_bytes(b"not a png")
    with pytest.raises(cc.CheckError, match="not a PNG"):
        cc.check_outputs(tmp_path, min_accuracy=0.5)


def _resolved(out: str) -> dict[str, Any]:
    """The compose file as `docker compose config --format json` gives it (merge keys and
    variables resolved)."""
    text = json.dumps(_compose_file()).replace("${PARAMSEL_DEMO_OUT:-./demo-output}", out)
    resolved: dict[str, Any] = json.loads(text)
    return resolved


def test_broken_copies_for_the_self_test() -> None:
    config = _resolved("/host/out")
    failing = cc.broken(config, "job-fails")
    assert "name" not in failing
    assert failing["services"]["demo"]["entrypoint"][-1].endswith("exit 1")
    assert failing["services"]["demo"]["command"] is None
    assert failing["services"]["paramsel"] == config["services"]["paramsel"]

    silent = cc.broken(config, "no-output", out="/host/out")
    assert silent["services"]["demo"]["volumes"] == []
    assert silent["services"]["superexec-serverapp"]["volumes"] == [], "where the ServerApp writes"
    command = silent["services"]["demo"]["command"]
    assert command[command.index("--rounds") + 1] == "2"
    assert config["services"]["demo"]["volumes"], "the original is left as it was"
    with pytest.raises(cc.CheckError, match="no service mounts /elsewhere"):
        cc.broken(config, "no-output", out="/elsewhere")


FAKE_DOCKER = """#!/bin/sh
# A stand-in for `docker`: `compose config` prints $FAKE/config.json; each `compose ps` prints the next
# $FAKE/ps.N (the last one again when they run out); `logs` prints a line.
case "$*" in
  "compose config --format json") cat "$FAKE/config.json" ;;
  "compose ps --all --format json")
    n=$(cat "$FAKE/calls" 2>/dev/null || echo 0)
    [ -f "$FAKE/ps.$((n + 1))" ] && n=$((n + 1)) && echo "$n" > "$FAKE/calls"
    cat "$FAKE/ps.$n" ;;
  logs*) echo "last words of $*" ;;
  *) echo "fake docker: $*" >&2; exit 3 ;;
esac
"""


def _run_wait(tmp_path: Path, polls: list[list[dict[str, Any]]]) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps(_resolved(str(tmp_path / "out"))))
    for index, poll in enumerate(polls, start=1):
        (fake / f"ps.{index}").write_text("".join(json.dumps(c) + "\n" for c in poll))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "wait", "--timeout", "30", "--poll", "0.05"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(fake)},
        timeout=60,
        check=False,
    )


def test_wait_returns_0_when_the_federation_is_over(tmp_path: Path) -> None:
    result = _run_wait(
        tmp_path,
        [
            _running(paramsel=_container("paramsel", health="starting")),
            _running(),
            _running(demo=_container("demo", "exited")),
        ],
    )
    assert result.returncode == 0, result.stderr
    assert "p-demo-1: exited 0" in result.stdout
    assert "every job exited 0" in result.stdout


def test_wait_fails_at_the_first_job_that_exits_non_zero(tmp_path: Path) -> None:
    """A job that fails: caught at the next poll, not at the timeout, with the culprit's last lines."""
    result = _run_wait(tmp_path, [_running(), _running(demo=_container("demo", "exited", 1))])
    assert result.returncode == 1
    assert "FAILED: p-demo-1: job exited 1" in result.stderr
    assert "last words of logs --tail 40 p-demo-1" in result.stderr
