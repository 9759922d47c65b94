"""Renders docs/api.md, the reference of paramsel.client, from its docstrings and signatures.

.venv/bin/python scripts/api_docs.py          # rewrite docs/api.md
.venv/bin/python scripts/api_docs.py --check  # fail when docs/api.md is stale (tests do this)
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import sys
from pathlib import Path

import paramsel.client

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _entry(name: str, value: object) -> list[str]:
    doc = inspect.getdoc(value) or ""
    if inspect.isclass(value) and issubclass(value, enum.Enum):
        # Its members, not its signature: the Enum constructor's differs between Python versions.
        members = [f"- `{m.name}` = `{m.value!r}`" for m in value]
        return [f"### `{name}`", "", doc, "", *members, ""]
    if inspect.isclass(value):
        lines = [f"### `{name}{_signature(value)}`", "", doc, ""]
        if dataclasses.is_dataclass(value):
            lines += [f"- `{f.name}`: {_field_doc(value, f.name)}" for f in dataclasses.fields(value)] + [""]
        for member, attr in inspect.getmembers(value):
            if member.startswith("_") or not (inspect.isfunction(attr) or isinstance(attr, property)):
                continue
            if member in value.__dict__:
                member_doc = inspect.getdoc(attr) or ""
                signature = _signature(attr) if inspect.isfunction(attr) else ""
                lines += [
                    f"- `{member}{signature}`" + (f": {member_doc.splitlines()[0]}" if member_doc else "")
                ]
        return [*lines, ""]
    if callable(value):
        return [f"### `{name}{_signature(value)}`", "", doc, ""]
    return [f"### `{name}`", "", f"`{value!r}`", ""]


def _signature(value: object) -> str:
    try:
        return str(inspect.signature(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _field_doc(cls: type, field: str) -> str:
    """The attribute docstring under a dataclass field (the string literal after it), if any."""
    source = inspect.getsource(cls).splitlines()
    for i, line in enumerate(source):
        if line.strip().startswith(f"{field}:") and i + 1 < len(source):
            nxt = source[i + 1].strip()
            if nxt.startswith('"""'):
                return nxt.strip('"')
    return ""


def render() -> str:
    lines = [
        "# paramsel.client reference",
        "",
        "Generated from the docstrings by `scripts/api_docs.py`; `tests/test_api_docs.py` fails when it is stale.",
        "",
        inspect.getdoc(paramsel.client) or "",
        "",
    ]
    for name in sorted(paramsel.client.__all__, key=str.lower):
        lines += _entry(name, getattr(paramsel.client, name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when docs/api.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOCS.exists() or DOCS.read_text() != text:
            print("docs/api.md is stale: run scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    DOCS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
