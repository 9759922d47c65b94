"""Checks requirements/dev.lock, and that a Python environment holds exactly what it pins.

    python3 scripts/check_lock.py --lock-only        # the lock alone (make lock and make setup run this)
    .venv/bin/python scripts/check_lock.py           # ...and the environment of the interpreter running it

The lock alone: every pin of requirements/constraints.txt is the lock's version (``torch==2.13.0`` is
met by the CPU build ``2.13.0+cpu``), torch is a CPU build, and no CUDA package (nvidia-*, triton)
is in it. The environment: the distributions in its site-packages are the lock's, at the lock's
versions, none missing and none extra - what ``pip freeze`` shows, with setuptools and without pip,
which the venv brings and nothing requires, and without the project's own editable installs that no
pin names (paramsel, and the demo's Flower App, paramsel-demo). The third, paramsel-client, is in the
lock as what paramsel requires, at that version, which the editable install from client_sdk/ has.
Standard library only (packaging is used when it is there), so any Python 3.10+ runs it.
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
# In every venv but pinned by no one: the installer itself. The server's distribution and the demo are
# installed from the checkout (and so is paramsel-client, which the lock pins as paramsel's dependency).
NOT_LOCKED = {"pip", "paramsel", "paramsel-demo"}
CUDA_PREFIXES = ("nvidia-", "triton", "cuda-")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#\\]+)")


def normalize(name: str) -> str:
    """A project name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(a: str, b: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return a.lower() == b.lower()
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a.lower() == b.lower()


def meets_pin(version: str, pin: str) -> bool:
    """``version`` satisfies ``==pin``: a pin without a local label (+cpu) accepts any local label."""
    if "+" not in pin and "+" in version:
        version = version.split("+", 1)[0]
    return same_version(version, pin)


def read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """``name==version`` lines of a requirements file: normalized name -> (name, version)."""
    pins: dict[str, tuple[str, str]] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalize(match[1])] = (match[1], match[2])
    return pins


def check_lock(lock: dict[str, tuple[str, str]], constraints: dict[str, tuple[str, str]]) -> list[str]:
    problems = []
    for key, (name, pin) in sorted(constraints.items()):
        if key not in lock:
            problems.append(f"{CONSTRAINTS.name} pins {name}=={pin}; the lock has no {name}")
        elif not meets_pin(lock[key][1], pin):
            problems.append(f"{CONSTRAINTS.name} pins {name}=={pin}; the lock has {name}=={lock[key][1]}")
    cuda = [
        f"{name}=={version}" for key, (name, version) in sorted(lock.items()) if key.startswith(CUDA_PREFIXES)
    ]
    if cuda:
        problems.append(f"CUDA packages in the lock (a CUDA build of torch was resolved): {', '.join(cuda)}")
    if "torch" in lock and not lock["torch"][1].endswith("+cpu"):
        problems.append(f"torch=={lock['torch'][1]} is not the CPU build (torch==X+cpu)")
    return problems


def installed() -> dict[str, tuple[str, set[str]]]:
    """The distributions in this interpreter's site-packages: normalized name -> (name, versions)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found: dict[str, tuple[str, set[str]]] = {}
    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), (name, set()))[1].add(dist.version)
    return found


def check_environment(lock: dict[str, tuple[str, str]]) -> list[str]:
    problems = []
    have = installed()
    for key, (name, pin) in sorted(lock.items()):
        if key not in have:
            problems.append(f"missing: {name}=={pin}")
        elif not all(same_version(version, pin) for version in have[key][1]):
            problems.append(f"{name}: installed {', '.join(sorted(have[key][1]))}, locked {pin}")
    for key, (name, versions) in sorted(have.items()):
        if key not in lock and key not in NOT_LOCKED:
            problems.append(f"not in the lock: {name}=={', '.join(sorted(versions))}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lock-only", action="store_true", help="check the lock file, not the environment")
    args = parser.parse_args(argv)
    lock = read_pins(LOCK)
    if not lock:
        print(f"{LOCK}: no pins found", file=sys.stderr)
        return 1
    problems = check_lock(lock, read_pins(CONSTRAINTS))
    if problems:
        print(f"{LOCK.relative_to(ROOT)} is stale or wrong; run `make lock`:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    if args.lock_only:
        print(f"{LOCK.relative_to(ROOT)}: {len(lock)} pins, consistent with {CONSTRAINTS.relative_to(ROOT)}")
        return 0
    problems = check_environment(lock)
    if problems:
        print(f"{sys.prefix} differs from {LOCK.relative_to(ROOT)}:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        print(
            "After a change to a pyproject.toml or requirements/constraints.txt, run `make lock` first. "
            "Rebuild the project's venv from the lock with: rm -rf .venv && make setup",
            file=sys.stderr,
        )
        return 1
    print(f"{sys.prefix}: exactly the {len(lock)} packages of {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
