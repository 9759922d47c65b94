"""The wheels users install, one per distribution: paramsel-client (client_sdk/pyproject.toml: the SDK,
the wire codec, the bindings) and paramsel (server/pyproject.toml: the server and its engine, on top of
paramsel-client). Every paramsel package in them is marked typed (PEP 561's ``py.typed``) and carries
its ``.pyi`` stubs, so that a type checker in a user's project reads paramsel's own annotations; each
package is in exactly one wheel, and ``paramsel`` itself is a namespace package in both (no
``paramsel/__init__.py``). The SDK's wheel alone, without the server's, imports and says what it lacks.

Each wheel is built from a copy of its folder (pyproject.toml, README.md and LICENSE, links to the
repository's own, and ``paramsel/``) in a scratch folder, so that nothing is written into the checkout;
offline: ``pip wheel --no-build-isolation --no-index`` with this environment's setuptools (``make setup``
installs it from the lock).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {"paramsel-client": "client_sdk", "paramsel": "server"}
"""Each distribution's name -> the folder of its pyproject.toml."""

PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]


def _pyproject(folder: str) -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    parsed: dict[str, Any] = tomllib.loads((ROOT / folder / "pyproject.toml").read_text(encoding="utf-8"))
    return parsed


def _packages(folder: str) -> list[str]:
    packages: list[str] = _pyproject(folder)["tool"]["setuptools"]["packages"]
    return packages


def _setuptools_floor(requires: list[str]) -> tuple[int, ...]:
    (setuptools,) = [r for r in requires if re.match(r"setuptools\b", r)]
    found = re.search(r">=\s*([\d.]+)", setuptools)
    assert found is not None, f"the build requirement {setuptools!r} names no floor"
    return tuple(int(part) for part in found.group(1).split("."))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


SLOW = pytest.mark.slow  # a wheel build: pip and setuptools in a process of their own


@pytest.mark.parametrize("folder", sorted(DISTRIBUTIONS.values()))
def test_the_setuptools_floor_builds_what_pyproject_uses(folder: str) -> None:
    """PEP 639's ``license = "Apache-2.0"`` needs setuptools 77: 76.1 refuses the build ("`project.license`
    must be valid exactly by one definition"), 77.0.1 builds it (77.0.0 is not served). Both were tried
    in a fresh venv; an older floor would let pip pick a setuptools that cannot build paramsel."""
    parsed = _pyproject(folder)
    build, project = parsed["build-system"], parsed["project"]
    floor = _setuptools_floor(build["requires"])
    if isinstance(project.get("license"), str):
        assert floor >= (77, 0, 1), (
            f"a PEP 639 license string needs setuptools >= 77.0.1, the floor is {floor}"
        )


def _build(folder: str, scratch: Path) -> Path:
    floor = _setuptools_floor(_pyproject(folder)["build-system"]["requires"])
    here = _version(importlib.metadata.version("setuptools"))
    if here < floor:  # pip would fetch a newer one in an isolated build; offline, this one must do
        pytest.skip(f"this environment's setuptools {here} is below the build floor {floor}")
    # Links (README.md, LICENSE) are copied as the files they name; a build's leftovers are not copied.
    source = scratch / "source" / folder
    shutil.copytree(
        ROOT / folder, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    out = scratch / "wheel"
    out.mkdir(parents=True)
    log = scratch / "build.log"
    with log.open("wb") as sink:
        done = subprocess.run(
            [*PIP_WHEEL, "--wheel-dir", str(out), str(source)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, log.read_text()
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, zipfile.ZipFile]:
    """Each distribution's name -> its wheel."""
    return {
        name: zipfile.ZipFile(_build(folder, tmp_path_factory.mktemp(folder)))
        for name, folder in DISTRIBUTIONS.items()
    }


def _metadata(wheel: zipfile.ZipFile) -> list[str]:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return wheel.read(metadata).decode().splitlines()


@SLOW
def test_every_package_is_typed_and_carries_its_stubs(wheels: dict[str, zipfile.ZipFile]) -> None:
    for name, folder in DISTRIBUTIONS.items():
        names = set(wheels[name].namelist())
        packages = _packages(folder)
        assert packages, f"{folder}/pyproject.toml lists no package"
        for package in packages:
            path = package.replace(".", "/")
            assert f"{path}/__init__.py" in names, f"{package} is not in {name}'s wheel"
            assert f"{path}/py.typed" in names, f"{package} has no py.typed in {name}'s wheel"
            stubs = sorted(p.name for p in (ROOT / folder / path).glob("*.pyi"))
            shipped = sorted(Path(n).name for n in names if n.startswith(f"{path}/") and n.endswith(".pyi"))
            assert shipped == stubs, f"{package}: stubs {stubs} in the source, {shipped} in the wheel"
    # The generated bindings, at least, are stubs-only typed: they are what a user's checker needs.
    assert "paramsel/v1/service_pb2.pyi" in wheels["paramsel-client"].namelist()


@SLOW
def test_each_package_is_in_one_wheel_and_paramsel_is_a_namespace(wheels: dict[str, zipfile.ZipFile]) -> None:
    """The two wheels install into one ``paramsel/`` folder: neither may hold a file of the other's, nor
    a ``paramsel/__init__.py``, which would make paramsel a regular package and hide the other half."""
    files = {name: {n for n in wheel.namelist() if ".dist-info/" not in n} for name, wheel in wheels.items()}
    assert not files["paramsel"] & files["paramsel-client"]
    for name, folder in DISTRIBUTIONS.items():
        assert "paramsel/__init__.py" not in files[name], name
        packages = {n.rpartition("/")[0].replace("/", ".") for n in files[name] if n.endswith(".py")}
        assert packages == set(_packages(folder)), f"{name}: {sorted(packages)}"


@SLOW
def test_the_server_wheel_requires_the_sdk_wheel_at_its_version(wheels: dict[str, zipfile.ZipFile]) -> None:
    client, server = _metadata(wheels["paramsel-client"]), _metadata(wheels["paramsel"])
    assert "Version: 0.1.0" in client
    assert "Version: 0.1.0" in server
    requires = {line.removeprefix("Requires-Dist: ") for line in server if line.startswith("Requires-Dist: ")}
    assert "paramsel-client==0.1.0" in requires, requires
    assert not [line for line in client if re.match(r"Requires-Dist: paramsel\b(?!-)", line)]
    (entry_points,) = [n for n in wheels["paramsel"].namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "paramsel = paramsel.server.cli:main" in wheels["paramsel"].read(entry_points).decode()


@SLOW
def test_the_license_is_the_spdx_expression(wheels: dict[str, zipfile.ZipFile]) -> None:
    """PEP 639's ``license = "Apache-2.0"``, which the setuptools floor is there for, reaches the
    metadata as a License-Expression, with the LICENSE file beside it (the repository's own: the
    folders' LICENSE is a link to it)."""
    for wheel in wheels.values():
        assert "License-Expression: Apache-2.0" in _metadata(wheel)
        (license_file,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert wheel.read(license_file) == (ROOT / "LICENSE").read_bytes()


_SDK_ALONE = """
import importlib.metadata, importlib.util, json, sys
sys.path[:0] = json.loads(sys.argv[1])
import paramsel.client, paramsel.v1, paramsel.wire
from paramsel.client import Client
found = {
    "client": paramsel.client.__file__,
    "version": importlib.metadata.version("paramsel-client"),
    "server": importlib.util.find_spec("paramsel.server") is not None,
    "engine": importlib.util.find_spec("paramsel.engine") is not None,
}
try:
    Client().server_info()  # no target: the embedded server, which is paramsel's
except ModuleNotFoundError as error:
    found["embedded"] = [error.name, str(error)]
print(json.dumps(found))
"""


@SLOW
def test_the_sdk_wheel_alone_imports_and_says_what_it_lacks(
    wheels: dict[str, zipfile.ZipFile], tmp_path: Path
) -> None:
    """paramsel-client unpacked alone beside this environment's other packages (paramsel's own left
    out; ``-S``: no .pth file, so no editable install either): the SDK imports from it, and the embedded
    server, paramsel's, is refused with the install command."""
    target = tmp_path / "sdk"
    wheels["paramsel-client"].extractall(target)
    others = tmp_path / "site-packages"
    others.mkdir()
    for folder in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for entry in Path(folder).iterdir():
            own = entry.name == "paramsel" or entry.name.startswith(
                ("paramsel-", "paramsel_", "__editable__")
            )
            if not own and not (others / entry.name).exists():
                (others / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k not in ("PARAMSEL_TARGET", "PYTHONPATH")}
    result = subprocess.run(
        [sys.executable, "-S", "-c", _SDK_ALONE, json.dumps([str(target), str(others)])],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result
    found = json.loads(result.stdout.splitlines()[-1])
    assert Path(found["client"]).is_relative_to(target), found
    assert found["version"] == "0.1.0"
    assert found["server"] is False
    assert found["engine"] is False
    name, message = found["embedded"]
    assert name == "paramsel.server"
    assert "pip install 'paramsel==0.1.0'" in message, message
