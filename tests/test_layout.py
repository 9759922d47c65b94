"""The architecture the README describes: the engine is pure, the contract lives in proto/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ENGINE = (
    "grpc",
    "google.protobuf",
    "paramsel.v1",
    "paramsel.wire",
    "paramsel.server",
    "paramsel.client",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_imports_neither_grpc_nor_protobuf() -> None:
    modules = sorted((ROOT / "server" / "paramsel" / "engine").glob("*.py"))
    assert modules
    for module in modules:
        for name in _imports(module):
            assert not name.startswith(FORBIDDEN_IN_ENGINE), f"{module.name} imports {name}"


def test_every_rpc_and_message_is_in_the_versioned_contract() -> None:
    protos = sorted((ROOT / "proto" / "paramsel" / "v1").glob("*.proto"))
    assert [p.name for p in protos] == ["criteria.proto", "service.proto", "tensor.proto"]
    for proto in protos:
        assert "package paramsel.v1;" in proto.read_text()
