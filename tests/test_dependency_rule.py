"""The dependency rule between paramsel's packages (CONTRIBUTING.md, "Layout and dependency rule").

``paramsel`` is one namespace package from two distributions, each built from its own root:
``client_sdk/`` is paramsel-client (paramsel.client, paramsel.wire, and paramsel.v1, generated from
proto/), ``server/`` is paramsel (paramsel.engine, paramsel.server), which depends on paramsel-client at
its own version; paramsel-client declares no dependency on paramsel. The folders are not the layers;
the packages are:

- ``paramsel.v1`` (generated) imports nothing of paramsel but itself;
- ``paramsel.wire`` (the codec both sides share) imports only ``paramsel.v1``, and no grpc;
- ``paramsel.engine`` (the computation) imports nothing of paramsel but itself, and no grpc or protobuf;
- ``paramsel.server`` may import engine, wire and v1; never ``paramsel.client``, except in the function
  bodies listed in :data:`SERVER_SEAMS`, each with its reason;
- ``paramsel.client`` may import wire and v1; ``paramsel.server`` and ``paramsel.engine`` only in the
  functions of one seam module, :data:`CLIENT_SEAM` (the service run in process, the embedded server,
  and the engine for what the SDK computes in process), so that the SDK imports without either.

The demo (``demo/paramsel_demo``, a Flower App of its own, outside the package) is a user of the SDK: of
paramsel it imports ``paramsel.client`` only (it starts ``paramsel serve`` as a program, not by import).

Imports are read from the source (ast), every ``.py`` under the two roots; an import under
``if TYPE_CHECKING:`` counts as a module-level one unless a seam lists it. A subprocess test checks what
importing the SDK really loads, and another the SDK without the server's distribution: what needs it
raises a ModuleNotFoundError that says so, and everything else works.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from paramsel.server.app import RunningServer

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("server", "client_sdk")
DEMO_PACKAGE = ROOT / "demo" / "paramsel_demo"

ALLOWED: dict[str, set[str]] = {
    "paramsel.v1": {"paramsel.v1"},
    "paramsel.wire": {"paramsel.wire", "paramsel.v1"},
    "paramsel.engine": {"paramsel.engine"},
    "paramsel.server": {"paramsel.server", "paramsel.engine", "paramsel.wire", "paramsel.v1"},
    "paramsel.client": {"paramsel.client", "paramsel.wire", "paramsel.v1"},
}
"""What each package may import at module level (itself included)."""

FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "paramsel.engine": ("grpc", "google.protobuf", "grpc_health", "grpc_reflection", "grpc_status"),
    "paramsel.wire": ("grpc", "grpc_health", "grpc_reflection", "grpc_status"),
}
"""Outside packages a layer may not import anywhere, lazily or not."""

SERVER_SEAMS: dict[tuple[str, str], tuple[set[str], str]] = {
    ("paramsel.server.cli", "_health"): (
        {"paramsel.client"},
        "`paramsel health` takes the SDK's Connection settings (TLS, certificate, token) as flags",
    ),
    ("paramsel.server.health_check", "check_health"): (
        {"paramsel.client"},
        "the probe resolves and connects as the SDK does, with the SDK's own torch-free code",
    ),
    ("paramsel.server.health_check", "_channel"): ({"paramsel.client"}, "the SDK's TLS credentials"),
    ("paramsel.server.health_check", "TYPE_CHECKING"): ({"paramsel.client"}, "the types of the above"),
}
"""(module, function) -> (packages that function body may import, beyond the rule; why)."""

CLIENT_SEAM = "paramsel.client._embedded"
"""The one SDK module whose functions may import paramsel.server and paramsel.engine."""


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    target: str  # the imported module (or name: ``from paramsel import engine`` -> paramsel.engine)
    scope: str  # "" at module level, "TYPE_CHECKING", else the enclosing top-level function or class
    line: int


def _module_name(path: Path) -> str:
    for root in SOURCE_ROOTS:
        base = ROOT / root
        if base in path.parents:
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise AssertionError(path)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, scope: str) -> Iterator[tuple[ast.AST, str]]:
    for child in ast.iter_child_nodes(node):
        inner = scope
        if not scope and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = child.name
        elif not scope and isinstance(child, ast.If) and _is_type_checking(child):
            inner = "TYPE_CHECKING"
        yield child, inner
        yield from _walk(child, inner)


def _imports_of(path: Path) -> Iterator[Import]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node, scope in _walk(ast.parse(path.read_text(), str(path)), ""):
        # A class body runs at import; only a function body is lazy.
        scope = "" if scope and isinstance(_top_level(path, scope), ast.ClassDef) else scope
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, scope, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            yield Import(module, source, scope, node.lineno)
            for alias in node.names:
                yield Import(module, f"{source}.{alias.name}", scope, node.lineno)


_TOP_LEVEL: dict[tuple[Path, str], ast.AST] = {}


def _top_level(path: Path, name: str) -> ast.AST | None:
    if (path, name) not in _TOP_LEVEL:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                _TOP_LEVEL[(path, node.name)] = node
        _TOP_LEVEL.setdefault((path, name), ast.Pass())
    return _TOP_LEVEL[(path, name)]


def _layer(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "paramsel" and len(parts) > 1 else name


def _all_imports() -> list[tuple[Path, Import]]:
    found: list[tuple[Path, Import]] = []
    for root in SOURCE_ROOTS:  # the packages, not a build's copies of them (ROOT / root / "build")
        for path in sorted((ROOT / root / "paramsel").rglob("*.py")):
            found.extend((path, imp) for imp in _imports_of(path))
    return found


IMPORTS = _all_imports()


def test_every_package_is_covered() -> None:
    importers = {_layer(imp.importer) for _, imp in IMPORTS}
    assert importers == set(ALLOWED), importers


def test_module_level_imports_follow_the_rule() -> None:
    broken = []
    for path, imp in IMPORTS:
        layer, target = _layer(imp.importer), _layer(imp.target)
        if not target.startswith("paramsel.") or target in ALLOWED[layer]:
            continue
        seam = SERVER_SEAMS.get((imp.importer, imp.scope))
        if seam is not None and target in seam[0]:
            continue
        lazy = imp.scope not in ("", "TYPE_CHECKING")
        if imp.importer == CLIENT_SEAM and lazy and target in ("paramsel.server", "paramsel.engine"):
            continue
        where = f"{path.relative_to(ROOT)}:{imp.line}"
        broken.append(f"{where}: {imp.importer} imports {imp.target} ({imp.scope or 'module level'})")
    assert not broken, "\n".join(broken)


def test_no_forbidden_third_party_imports() -> None:
    broken = [
        f"{path.relative_to(ROOT)}:{imp.line}: {imp.importer} imports {imp.target}"
        for path, imp in IMPORTS
        for prefix in FORBIDDEN_THIRD_PARTY.get(_layer(imp.importer), ())
        if imp.target == prefix or imp.target.startswith(prefix + ".")
    ]
    assert not broken, "\n".join(broken)


def test_every_listed_seam_is_used_and_commented() -> None:
    used = {(imp.importer, imp.scope) for _, imp in IMPORTS if _layer(imp.target) == "paramsel.client"}
    for (module, scope), (_, why) in SERVER_SEAMS.items():
        assert why
        assert (module, scope) in used, f"stale seam {module}:{scope}: remove it from SERVER_SEAMS"
    # Each lazy import of the SDK in the server says why: a "seam" comment on its line or in the five
    # lines above it (a group of imports shares one).
    for path, imp in IMPORTS:
        if _layer(imp.importer) != "paramsel.server" or imp.scope in ("", "TYPE_CHECKING"):
            continue
        if _layer(imp.target) != "paramsel.client":
            continue
        lines = path.read_text().splitlines()[max(0, imp.line - 6) : imp.line]
        assert any("seam" in line.lower() for line in lines), f"{path.relative_to(ROOT)}:{imp.line}"
    seam = [imp for _, imp in IMPORTS if imp.importer == CLIENT_SEAM]
    assert any(_layer(imp.target) == "paramsel.server" for imp in seam)
    assert any(_layer(imp.target) == "paramsel.engine" for imp in seam)


def test_the_demo_uses_only_the_sdk() -> None:
    """The demo's Flower App imports, of paramsel, only the SDK (anywhere, lazily or not)."""
    paths = sorted(DEMO_PACKAGE.rglob("*.py"))
    assert paths, DEMO_PACKAGE
    broken = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "paramsel" and _layer(name) != "paramsel.client":
                    broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}")
    assert not broken, "\n".join(broken)


def _loaded_after(code: str) -> dict[str, bool]:
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    probe = (
        "import json, sys\n"
        f"{code}\n"
        "print(json.dumps({p: any(m == p or m.startswith(p + '.') for m in sys.modules)"
        " for p in ('paramsel.server', 'paramsel.engine')}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, env=env, check=False
    )
    assert result.returncode == 0, result
    loaded: dict[str, bool] = json.loads(result.stdout.splitlines()[-1])
    return loaded


DROP_IN = """
import paramsel.client
from paramsel.client import (
    Client, Connection, DynamicLayerExchanger, FedPmExchanger, LayerSelectionFunctionConstructor,
    ParamselError, SparseCooParameterExchanger, TopK, aggregate_layers, aggregate_sparse_coo,
    largest_magnitude_change_scores, pack_compact, select_scores_and_sample_masks, unpack_compact,
)
own = lambda model, initial: {n: t.abs() for n, t in model.state_dict().items()}
target = "127.0.0.1:1"  # never called here
exchangers = [
    SparseCooParameterExchanger(0.5, own, target=target),
    SparseCooParameterExchanger(0.5, largest_magnitude_change_scores, target=target),
    DynamicLayerExchanger(LayerSelectionFunctionConstructor(1.0, 0.5).select_by_percentage(), target=target),
    FedPmExchanger(target=target),
]
"""


@pytest.mark.parametrize("code", ["import paramsel.client", "import paramsel.wire, paramsel.v1", DROP_IN])
@pytest.mark.slow  # starts another Python
def test_the_sdk_imports_without_the_server_or_the_engine(code: str) -> None:
    assert _loaded_after(code) == {"paramsel.server": False, "paramsel.engine": False}


@pytest.mark.slow  # starts another Python
def test_a_callers_own_score_function_loads_neither_when_called(server: RunningServer) -> None:
    # Scored in process, selected by the service (ScoreFunction.SUPPLIED): the engine stays out.
    loaded = _loaded_after(
        DROP_IN
        + "import torch\n"
        + f"exchangers[0].client = Client(target={server.target!r})\n"
        + "exchangers[0].select_parameters(torch.nn.Linear(2, 2))\n"
    )
    assert loaded == {"paramsel.server": False, "paramsel.engine": False}


# -- the two distributions ----------------------------------------------------------------------------


def _project(root: str) -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    parsed: dict[str, Any] = tomllib.loads((ROOT / root / "pyproject.toml").read_text(encoding="utf-8"))
    project: dict[str, Any] = parsed["project"]
    return project


def _requirement_names(requirements: list[str]) -> dict[str, str]:
    """normalized name -> the requirement's text."""
    found = {}
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match, requirement
        found[re.sub(r"[-_.]+", "-", match.group(0)).lower()] = requirement
    return found


def test_the_sdks_distribution_needs_nothing_of_the_servers() -> None:
    client = _project("client_sdk")
    assert client["name"] == "paramsel-client"
    names = set(_requirement_names(client["dependencies"]))
    for extra in client.get("optional-dependencies", {}).values():
        names |= set(_requirement_names(extra))
    assert "paramsel" not in names, "client_sdk/pyproject.toml must not depend on the server's distribution"
    # Nor on what only the server imports.
    assert not names & {"grpcio-health-checking", "grpcio-reflection", "prometheus-client"}, names


def test_the_servers_distribution_needs_the_sdk_at_its_own_version() -> None:
    client, server = _project("client_sdk"), _project("server")
    assert server["name"] == "paramsel"
    assert server["version"] == client["version"], "the two distributions are released together"
    requirement = _requirement_names(server["dependencies"]).get("paramsel-client")
    assert requirement is not None, "server/pyproject.toml must depend on paramsel-client"
    assert re.sub(r"\s", "", requirement) == f"paramsel-client=={client['version']}"


_WITHOUT_THE_SERVER = """
import importlib.abc, sys

class WithoutTheServer(importlib.abc.MetaPathFinder):
    # paramsel-client installed alone: paramsel.server and paramsel.engine are not to be found.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] in (["paramsel", "server"], ["paramsel", "engine"]):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, WithoutTheServer())
"""


def _sdk_alone(code: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_SERVER + code],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return found


@pytest.mark.slow  # starts another Python
def test_the_sdk_alone_calls_a_server_and_says_what_needs_paramsel(server: RunningServer) -> None:
    """What paramsel-client does without paramsel: everything that calls a server; the work done in
    this process by the server's code (the embedded server, the engine's pulls and local scores)
    raises a ModuleNotFoundError naming the missing package and the install command."""
    found = _sdk_alone(
        DROP_IN
        + "import json, torch\n"
        + "from paramsel.client import FedPmExchanger\n"
        + f"remote = Client(target={server.target!r})\n"
        + "exchangers[0].client = remote\n"
        + "model = torch.nn.Linear(2, 2)\n"
        + "packed = exchangers[0].push_parameters(model)\n"
        + "def refusal(work):\n"
        + "    try:\n"
        + "        work()\n"
        + "    except ModuleNotFoundError as error:\n"
        + "        return [error.name, str(error)]\n"
        + "    return None\n"
        + "layers = exchangers[2].pack_parameters([model.weight.detach().numpy()], ['weight'])\n"
        + "print(json.dumps({\n"
        + "    'info': remote.server_info().server_version,\n"
        + "    'pushed': len(packed),\n"
        + "    'embedded': refusal(lambda: Client().server_info()),\n"
        + "    'pull': refusal(lambda: exchangers[0].pull_parameters(packed, model)),\n"
        + "    'layers': refusal(lambda: exchangers[2].pull_parameters(layers, model)),\n"
        + "    'scores': refusal(lambda: largest_magnitude_change_scores(model, model)),\n"
        + "}))\n"
    )
    assert found["info"]
    assert found["pushed"] > 0
    for work in ("embedded", "pull", "layers", "scores"):
        assert found[work] is not None, f"{work}: no ModuleNotFoundError"
        name, message = found[work]
        assert name == ("paramsel.server" if work == "embedded" else "paramsel.engine"), found[work]
        assert "paramsel-client" in message, message
        assert "pip install 'paramsel==" in message, message
    assert "$PARAMSEL_TARGET" in found["embedded"][1]
