"""Print the requirements of distributions in an oracle folder that the running environment lacks.

The oracle folder (see requirements/oracle.txt) is unpacked with --no-deps, because FL4Health's declared
pins cannot be met beside paramsel's lowest supported versions. Where the environment has no flwr at
all (flwr 1.18 needs numpy >= 1.26), the oracle's flwr still has to import, so its own dependencies
(typer, cryptography, ...) must come along. This lists, one per line, each requirement of the named
distributions whose project the environment does not have, markers evaluated for this interpreter;
projects the environment already has (numpy, protobuf, grpcio) are left to it.

Usage: python scripts/oracle_missing.py ORACLE_FOLDER DIST [DIST ...]
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(oracle: str, names: list[str]) -> list[str]:
    installed = {_canonical(d.metadata["Name"]) for d in md.distributions()}
    wanted = {_canonical(n) for n in names}
    lines: list[str] = []
    for dist in md.distributions(path=[oracle]):
        if _canonical(dist.metadata["Name"]) not in wanted:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if _canonical(req.name) not in installed:
                lines.append(str(req))
    return sorted(set(lines))


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    for line in missing(sys.argv[1], sys.argv[2:]):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
