"""The wheel users install: every paramsel package in it is marked typed (PEP 561's ``py.typed``) and
carries its ``.pyi`` stubs, so that a type checker in a user's project reads paramsel's own annotations.

The wheel is built from a copy of what the build reads (pyproject.toml, README.md, LICENSE and the
package folders) in a scratch folder, so that nothing is written into the checkout; offline: ``pip wheel
--no-build-isolation --no-index`` with this environment's setuptools (``make setup`` installs it from the
lock).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]


def _pyproject() -> dict[str, object]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    parsed: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return parsed


def _setuptools_floor(requires: list[str]) -> tuple[int, ...]:
    (setuptools,) = [r for r in requires if re.match(r"setuptools\b", r)]
    found = re.search(r">=\s*([\d.]+)", setuptools)
    assert found is not None, f"the build requirement {setuptools!r} names no floor"
    return tuple(int(part) for part in found.group(1).split("."))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


SLOW = pytest.mark.slow  # a wheel build: pip and setuptools in a process of their own


def test_the_setuptools_floor_builds_what_pyproject_uses() -> None:
    """PEP 639's ``license = "Apache-2.0"`` needs setuptools 77: 76.1 refuses the build ("`project.license`
    must be valid exactly by one definition"), 77.0.1 builds it (77.0.0 is not served). Both were tried
    in a fresh venv; an older floor would let pip pick a setuptools that cannot build paramsel."""
    parsed = _pyproject()
    build, project = parsed["build-system"], parsed["project"]
    assert isinstance(build, dict)
    assert isinstance(project, dict)
    floor = _setuptools_floor(build["requires"])
    if isinstance(project.get("license"), str):
        assert floor >= (77, 0, 1), (
            f"a PEP 639 license string needs setuptools >= 77.0.1, the floor is {floor}"
        )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    build = _pyproject()["build-system"]
    assert isinstance(build, dict)
    floor = _setuptools_floor(build["requires"])
    here = _version(importlib.metadata.version("setuptools"))
    if here < floor:  # pip would fetch a newer one in an isolated build; offline, this one must do
        pytest.skip(f"this environment's setuptools {here} is below the build floor {floor}")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    package_dirs = _pyproject()["tool"]["setuptools"]["package-dir"]  # type: ignore[index]
    for folder in package_dirs.values():
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    log = out / "build.log"
    with log.open("wb") as sink:
        done = subprocess.run(
            [*PIP_WHEEL, "--wheel-dir", str(out), str(source)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, log.read_text()
    (built,) = out.glob("paramsel-*.whl")
    return zipfile.ZipFile(built)


@SLOW
def test_every_package_is_typed_and_carries_its_stubs(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    setuptools_config = _pyproject()["tool"]["setuptools"]  # type: ignore[index]
    packages: list[str] = setuptools_config["packages"]
    package_dirs: dict[str, str] = setuptools_config["package-dir"]
    assert packages, "pyproject.toml lists no package"
    for package in packages:
        folder = package.replace(".", "/")
        assert f"{folder}/__init__.py" in names, f"{package} is not in the wheel"
        assert f"{folder}/py.typed" in names, f"{package} has no py.typed in the wheel"
        stubs = sorted(p.name for p in (ROOT / package_dirs[package]).glob("*.pyi"))
        shipped = sorted(Path(n).name for n in names if n.startswith(f"{folder}/") and n.endswith(".pyi"))
        assert shipped == stubs, f"{package}: stubs {stubs} in the source, {shipped} in the wheel"
    # The generated bindings, at least, are stubs-only typed: they are what a user's checker needs.
    assert "paramsel/v1/service_pb2.pyi" in names


@SLOW
def test_the_license_is_the_spdx_expression(wheel: zipfile.ZipFile) -> None:
    """PEP 639's ``license = "Apache-2.0"``, which the setuptools floor is there for, reaches the
    metadata as a License-Expression, with the LICENSE file beside it."""
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
