"""The Dockerfile and docker-compose.yml: linted by real tools, and checked for what issues 4 and 12 ask.

These need no Docker engine: hadolint, the compose-spec schema and Compose's own ``config`` (when its
binary is here) check the files; ``make compose-demo`` (scripts/compose_ci.sh) builds and runs them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE_IMAGE = "python:3.11-slim-bookworm"


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions():
        if keyword == "FROM":
            stages.append([])
        assert stages, "instructions before the first FROM"
        stages[-1].append((keyword, args))
    return stages


def _only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [args for k, args in stage if k == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def test_check_container_script_passes() -> None:
    tools = [BIN / "hadolint", BIN / "check-jsonschema"]
    missing = [t.name for t in tools if not t.exists()]
    if missing:
        pytest.fail(f"{missing} not installed: make setup")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_container.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BIN": str(BIN)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def _stage_names() -> list[str]:
    return [stage[0][1].split()[-1] if " AS " in stage[0][1].upper() else "" for stage in _stages()]


def _stage(name: str) -> list[tuple[str, str]]:
    return _stages()[_stage_names().index(name)]


def test_stages_on_pinned_slim_python_and_the_server_is_the_default_target() -> None:
    names = _stage_names()
    assert names == ["builder", "demo-builder", "runtime", "demo", "server"]
    for stage in _stages():
        image = stage[0][1].split()[0]
        assert image == BASE_IMAGE or image in names, f"FROM {image}: every base is {BASE_IMAGE} or a stage"
    assert _stage("builder")[0][1] == f"{BASE_IMAGE} AS builder"
    assert _stage("runtime")[0][1] == f"{BASE_IMAGE} AS runtime"
    assert _stage("demo-builder")[0][1] == "builder AS demo-builder"
    assert names[-1] == "server", "`docker build .` builds the last stage: the server image"


def test_builder_installs_cpu_torch_and_the_wheels_of_paramsel_into_a_venv() -> None:
    builder = " ; ".join(args for k, args in _stage("builder") if k == "RUN")
    assert "python -m venv /opt/venv" in builder
    assert "pip install --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in builder
    lock = (ROOT / "requirements" / "dev.lock").read_text()
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert "torch==2.13.0+cpu\n" in lock, "the image's torch is the one CI tests"
    assert "torch==2.13.0\n" in constraints
    # a wheel of each distribution, each from its folder
    assert "pip wheel --no-deps --wheel-dir /wheels ./client_sdk ./server" in builder
    # the server's venv: paramsel and the paramsel-client it requires, at the lock's versions, without
    # torch's compile-time packages
    both = "/wheels/paramsel_client-*.whl /wheels/paramsel-*.whl"
    assert f"pip install --constraint requirements/dev.lock {both}" in builder
    assert "pip uninstall --yes sympy mpmath networkx" in builder
    demo = " ; ".join(args for k, args in _stage("demo-builder") if k == "RUN")
    assert 'pip install --constraint requirements/dev.lock "${wheel}[demo]"' in demo
    # the Flower App: editable in the folder the demo image keeps, so that paramsel-demo finds its
    # pyproject.toml beside its package; its dependencies are the extra's, already installed
    assert ("COPY", "demo/ /opt/paramsel-demo/") in _stage("demo-builder")
    assert "pip install --no-deps --editable /opt/paramsel-demo" in demo
    assert "pip check" in demo


def test_a_filled_wheelhouse_is_the_only_source_of_the_build() -> None:
    """With wheels in wheelhouse/, pip gets --no-index and the wheelhouse as its only source."""
    builder = _stage("builder")
    copies = [args for k, args in builder if k == "COPY"]
    # torch's wheel alone first (its layer survives a change to the others), then the whole wheelhouse
    assert copies.index("wheelhouse/README.md wheelhouse/torch-* /wheelhouse/") < copies.index(
        "wheelhouse/ /wheelhouse/"
    )
    keywords = list(builder)
    torch_install = next(i for i, (k, a) in enumerate(keywords) if k == "RUN" and "torch==" in a)
    assert torch_install < keywords.index(("COPY", "wheelhouse/ /wheelhouse/"))
    assert torch_install < keywords.index(("COPY", "requirements/dev.lock requirements/dev.lock"))
    rule = next(args for k, args in builder if k == "RUN" and "/wheelhouse" in args)
    assert "find /wheelhouse -name '*.whl'" in rule
    assert "no-index = true" in rule
    assert "find-links = /wheelhouse" in rule
    assert "> /etc/pip.conf" in rule
    committed = sorted(p.name for p in (ROOT / "wheelhouse").iterdir() if not p.name.endswith(".whl"))
    assert "README.md" in committed, "the folder exists in a checkout, so that COPY finds it"
    assert "!wheelhouse/README.md" in (ROOT / ".gitignore").read_text().splitlines()


def test_images_copy_only_a_venv_and_run_as_non_root() -> None:
    for stage, builder, extra in (
        ("server", "builder", []),
        ("demo", "demo-builder", ["--from=demo-builder /opt/paramsel-demo /opt/paramsel-demo"]),
    ):
        final = _stage(stage)
        copies = [args for k, args in final if k == "COPY"]
        assert copies == [f"--from={builder} /opt/venv /opt/venv", *extra], stage
        assert not any(k == "RUN" for k, _ in final), f"{stage}: nothing installed in a final stage"
    runtime = _stage("runtime")
    assert not any(k == "COPY" for k, _ in runtime)
    user = _only(runtime, "USER").split(":")[0]
    assert user not in ("root", "0")
    keywords = [k for k, _ in runtime]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_entrypoint_cmd_port_signal_and_healthcheck() -> None:
    final = _stage("runtime")
    assert _only(final, "EXPOSE") == "50051"
    assert json.loads(_only(final, "CMD")) == ["serve", "--host", "0.0.0.0", "--port", "50051"]
    assert _only(final, "STOPSIGNAL") == "SIGTERM"
    healthcheck = _only(final, "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    probe = json.loads(command)
    assert probe[:4] == ["paramsel", "health", "--target", "127.0.0.1:50051"]
    probe_timeout = float(probe[probe.index("--timeout") + 1]) if "--timeout" in probe else 5.0
    flags = dict(opt.removeprefix("--").split("=", 1) for opt in shlex.split(options))
    assert float(flags["timeout"].removesuffix("s")) > probe_timeout, "docker must not kill the probe first"
    assert "grpc_health_probe" not in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize(
    ("arguments", "paramsel_gets"),
    [
        ([], ["serve", "--host", "0.0.0.0", "--port", "50051"]),
        (["--help"], ["--help"]),
        (["paramsel", "--help"], ["--help"]),
        (["serve", "--port", "6000"], ["serve", "--port", "6000"]),
        (["paramsel", "health", "--target", "x:1"], ["health", "--target", "x:1"]),
        (["health", "paramsel"], ["health", "paramsel"]),
    ],
)
def test_entrypoint_takes_paramsels_arguments_with_or_without_paramsel_first(
    tmp_path: Path, arguments: list[str], paramsel_gets: list[str]
) -> None:
    """`docker run IMAGE ARGS`: the ENTRYPOINT, run by /bin/sh as docker runs it, with a stand-in
    `paramsel` that prints what it was given."""
    entrypoint = json.loads(_only(_stage("runtime"), "ENTRYPOINT"))
    cmd = json.loads(_only(_stage("runtime"), "CMD"))
    fake = tmp_path / "paramsel"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    result = subprocess.run(
        [*entrypoint, *(arguments or cmd)],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        check=True,
        timeout=30,
    )
    assert result.stdout.splitlines() == paramsel_gets


def test_build_context_has_what_the_builder_copies() -> None:
    """The .dockerignore is an allowlist: each path the builder COPYs must be on it."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for keyword, args in _stage("builder") + _stage("demo-builder"):
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                path = source.rstrip("/")
                parents = {path, *(str(p) for p in Path(path).parents)}
                assert parents & allowed, f"COPY {source} is excluded by .dockerignore"
                assert "*" in source or (ROOT / source).exists(), source


def _compose() -> dict[str, Any]:
    # ruamel.yaml comes with check-jsonschema (a dev dependency) and resolves the file's merge keys.
    from ruamel.yaml import YAML

    loaded: dict[str, Any] = YAML(typ="safe").load(ROOT / "docker-compose.yml")
    return loaded


def _seconds(duration: str) -> float:
    assert re.fullmatch(r"\d+s", duration), duration
    return float(duration[:-1])


FLOWER_SERVICES = {
    "superlink": "flower-superlink",
    "superexec-serverapp": "flower-superexec",
    **{f"supernode-{i}": "flower-supernode" for i in range(3)},
    **{f"superexec-{i}": "flower-superexec" for i in range(3)},
}


def test_compose_services_network_and_commands() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"paramsel", "demo", *FLOWER_SERVICES}
    assert compose["networks"] == {"fednet": {}}
    for name, service in services.items():
        assert service["networks"] == ["fednet"], name
        assert "ports" not in service, f"{name}: the federation stays on the private network"
    # The lean server image serves; the demo image runs Flower and the demo's Flower App. Both are
    # targets of the Dockerfile, named by the compose file, so that `up` builds them rather than pulling.
    assert services["paramsel"]["image"] == "paramsel:0.1.0"
    assert services["paramsel"]["build"]["target"] == "server"
    for name in ("demo", *FLOWER_SERVICES):
        assert services[name]["image"] == "paramsel-demo:0.1.0", name
        assert services[name]["build"]["target"] == "demo", name
        assert services[name]["init"] is True, f"{name}: its stop signal is forwarded, its children reaped"
    for name, program in FLOWER_SERVICES.items():
        assert services[name]["entrypoint"] == [program], name
        # Flower's programs exit 143 on SIGTERM and 0 on SIGINT (tests/test_compose_processes.py).
        assert services[name]["stop_signal"] == "SIGINT", name
        assert "--insecure" in services[name]["command"], name
    link = services["superlink"]["command"]
    assert "--disable-runtime-dependency-installation" in link, "the image has the app's packages"
    assert link[link.index("--isolation") + 1] == "process", "the ServerApp runs in its own SuperExec"
    link_address = f"superlink:{link[link.index('--port') + 1]}"
    for i in range(3):
        node = services[f"supernode-{i}"]["command"]
        assert node[node.index("--superlink") + 1] == link_address
        assert node[node.index("--isolation") + 1] == "process"
        assert node[node.index("--node-config") + 1] == f"partition-id={i} num-partitions=3"
        runtime = services[f"superexec-{i}"]["command"]
        assert (
            runtime[runtime.index("--runtime-api-address") + 1]
            == f"supernode-{i}:{node[node.index('--port') + 1]}"
        )
        assert services[f"superexec-{i}"]["depends_on"][f"supernode-{i}"] == {"condition": "service_healthy"}
    serverapp = services["superexec-serverapp"]["command"]
    assert serverapp[serverapp.index("--runtime-api-address") + 1] == link_address
    # The job: the launcher against that SuperLink, its clients as many as the SuperNodes; it reads the
    # service's address from PARAMSEL_TARGET and passes it to every app in the run config.
    demo = services["demo"]
    assert demo["entrypoint"] == ["paramsel-demo"]
    from paramsel_demo import launcher

    assert launcher.ENV_TARGET == "PARAMSEL_TARGET"
    assert demo["environment"]["PARAMSEL_TARGET"] == "paramsel:50051"
    options = launcher._parser().parse_args(demo["command"])
    assert options.superlink == link_address
    assert options.clients == 3
    assert 1 <= options.rounds <= 3, "CI's run stays short"
    for name in services:
        if name not in ("paramsel", "demo"):
            assert name in demo["depends_on"], f"the job starts after {name}"
    for name in ("paramsel", "superlink", "supernode-0", "supernode-1", "supernode-2"):
        assert demo["depends_on"][name] == {"condition": "service_healthy"}, name
    # The image's HEALTHCHECK probes a paramsel server on 50051, which these containers do not run:
    # each has its own (Flower's GET /health on its port) or none.
    for name in ("demo", *FLOWER_SERVICES):
        check = services[name]["healthcheck"]
        assert check.get("disable") or "/health" in " ".join(check["test"]), name


def test_compose_roles_tell_the_ci_what_to_expect() -> None:
    """scripts/compose_ci.sh reads what each service must do from its label: jobs run to their end."""
    services = _compose()["services"]
    roles = {name: service["labels"]["paramsel.ci.role"] for name, service in services.items()}
    assert roles == {"paramsel": "service", "demo": "job", **dict.fromkeys(FLOWER_SERVICES, "service")}


def test_compose_demo_outputs_go_to_a_host_folder_the_serverapp_and_the_demo_share() -> None:
    services = _compose()["services"]
    command = services["demo"]["command"]
    out = command[command.index("--out") + 1]
    for name in ("demo", "superexec-serverapp"):
        service = services[name]
        (volume,) = service["volumes"]
        assert volume["type"] == "bind"
        assert volume["source"] == "${PARAMSEL_DEMO_OUT:-./demo-output}"
        # The ServerApp writes where the job's --out says (the run config's out-dir): the same path.
        assert volume["target"] == out == "/home/paramsel/demo-output", name
        # A missing folder fails `up` at once, not a root-owned folder the run cannot write.
        assert volume["bind"] == {"create_host_path": False}
        # By default the images' user; PARAMSEL_DEMO_USER makes it the caller.
        user = re.fullmatch(r"\$\{PARAMSEL_DEMO_USER:-(\d+:\d+)\}", service["user"])
        assert user, service["user"]
        assert user.group(1) == _only(_stage("runtime"), "USER")
    assert _only(_stage("runtime"), "WORKDIR") == "/home/paramsel"
    assert "demo-output/" in (ROOT / ".gitignore").read_text().splitlines()


def _docker_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### With Docker")
    return readme[start : readme.index("\n#", start + 1)]


def test_minimum_engine_and_compose_are_stated_alike_everywhere() -> None:
    """x-requires is what scripts check (compose_ci.sh asserts the engine and Compose it runs against
    it); the compose file's header and the README state the same numbers."""
    requires = _compose()["x-requires"]
    assert requires == {"engine": "25.0", "compose": "2.20.2"}
    header = (ROOT / "docker-compose.yml").read_text().split("\nname:")[0]
    docker_section = _docker_section()
    for text in (header, docker_section):
        assert f"Docker Engine >= {requires['engine']}" in text or f"Engine ≥ {requires['engine']}" in text
        assert f"Compose v2 >= {requires['compose']}" in text or f"Compose ≥ {requires['compose']}" in text
    engine_script = (ROOT / "scripts" / "docker_engine.sh").read_text()
    assert f"[{requires['compose']}]=" in engine_script, "docker_engine.sh can fetch the minimum Compose"


def test_readme_builds_and_runs_the_images_the_compose_file_names() -> None:
    docker_section = _docker_section()
    services = _compose()["services"]
    images = {s["image"]: s["build"]["target"] for s in services.values()}
    built = re.findall(r"docker build --target (\S+) -t (\S+) \.", docker_section)
    assert built, "the README shows how to build each image"
    assert {tag: target for target, tag in built} == images
    for tag in re.findall(r"docker run (?:[^`\n]*? )?(paramsel\S*:\S+)", docker_section):
        assert tag in images, f"README runs {tag}, which the compose file does not name"
    # `up --exit-code-from` implies --abort-on-container-exit: serve is stopped at once, its drain unseen.
    assert "up --build --exit-code-from" not in docker_section
    assert "docker compose wait demo" in docker_section


def test_compose_server_drains_within_its_stop_grace_period() -> None:
    server = _compose()["services"]["paramsel"]
    command = server["command"]
    assert command[:5] == ["serve", "--host", "0.0.0.0", "--port", "50051"]
    grace = re.fullmatch(
        r"\$\{PARAMSEL_GRACE_SECONDS:-(\d+)\}", command[command.index("--grace-seconds") + 1]
    )
    assert grace, "the grace comes from PARAMSEL_GRACE_SECONDS"
    assert server["stop_signal"] == "SIGTERM"
    assert _seconds(server["stop_grace_period"]) > float(grace.group(1))
    check = server["healthcheck"]
    assert check["test"][:5] == ["CMD", "paramsel", "health", "--target", "127.0.0.1:50051"]
