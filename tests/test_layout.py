"""The architecture the README describes: the engine is pure, the contract lives in proto/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The imports between packages (the engine imports neither grpc nor protobuf, ...): test_dependency_rule.py.


def test_every_rpc_and_message_is_in_the_versioned_contract() -> None:
    protos = sorted((ROOT / "proto" / "paramsel" / "v1").glob("*.proto"))
    assert [p.name for p in protos] == ["criteria.proto", "service.proto", "tensor.proto"]
    for proto in protos:
        assert "package paramsel.v1;" in proto.read_text()
