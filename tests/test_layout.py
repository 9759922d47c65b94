"""The architecture the README describes: the engine is pure, the contract lives in proto/, and each
distribution is built from a folder of its own: client_sdk/ (paramsel-client) and server/ (paramsel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The imports between packages (the engine imports neither grpc nor protobuf, ...) and the dependencies
# between the two distributions: test_dependency_rule.py. What their wheels hold: test_wheel.py.
DISTRIBUTIONS = {"client_sdk": "paramsel-client", "server": "paramsel"}


def _toml(path: Path) -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    parsed: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    return parsed


def test_every_rpc_and_message_is_in_the_versioned_contract() -> None:
    protos = sorted((ROOT / "proto" / "paramsel" / "v1").glob("*.proto"))
    assert [p.name for p in protos] == ["criteria.proto", "service.proto", "tensor.proto"]
    for proto in protos:
        assert "package paramsel.v1;" in proto.read_text()


@pytest.mark.parametrize(("folder", "name"), sorted(DISTRIBUTIONS.items()))
def test_each_folder_builds_one_distribution_of_its_own_packages(folder: str, name: str) -> None:
    """The folder's pyproject.toml names the distribution and lists every package under its
    ``paramsel/``, no more: a package added to the folder and not to the list would be left out of the
    wheel. ``paramsel`` is a namespace package that both folders share, so neither has its __init__.py."""
    config = _toml(ROOT / folder / "pyproject.toml")
    assert config["project"]["name"] == name
    assert "package-dir" not in config["tool"]["setuptools"], "each folder is its distribution's root"
    found = sorted(f"paramsel.{p.parent.name}" for p in (ROOT / folder / "paramsel").glob("*/__init__.py"))
    assert sorted(config["tool"]["setuptools"]["packages"]) == found
    assert not (ROOT / folder / "paramsel" / "__init__.py").exists()
    # The build reads README.md and LICENSE beside pyproject.toml: links to the repository's own.
    for shared in ("README.md", "LICENSE"):
        assert (ROOT / folder / shared).resolve() == ROOT / shared, f"{folder}/{shared}"


def test_the_root_holds_the_tools_configuration_and_one_mypy_root_per_distribution() -> None:
    config = _toml(ROOT / "pyproject.toml")
    assert "project" not in config, "the root is no distribution: client_sdk/ and server/ are"
    assert "build-system" not in config
    roots = config["tool"]["mypy"]["mypy_path"].split(":")
    for folder in DISTRIBUTIONS:
        assert roots.count(folder) == 1, roots
