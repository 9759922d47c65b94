#!/usr/bin/env bash
# Regenerates requirements/dev.lock (`make lock`): every package that `make setup`'s
# `pip install -e ./client_sdk -e "./server[dev,demo]"` brings, transitive ones included, pinned by
# pip-compile (pip-tools, in an environment of its own, .venv-lock, pinned in requirements/lock-tools.txt).
# Inputs: the ranges of both distributions' pyproject.toml files (kept as ranges: the SDK lives in
# users' environments) held to requirements/constraints.txt, the hand-kept pins of the packages this
# project chooses versions of (torch, numpy, grpcio, protobuf, the tools...).
#
# The server's distribution requires paramsel-client at its own version, which no index has: it is
# built here into a scratch folder that pip-compile reads as --find-links (the lock names no folder). So
# the lock pins paramsel-client==VERSION too, which the editable install of client_sdk/ meets.
# `make setup` installs with the lock as constraints; scripts/check_lock.py compares an environment
# with it.
#
# pip-compile keeps the lock's existing pins where they still fit; extra arguments go to it, e.g.
#   scripts/lock.sh --upgrade-package ruff   # move one package to its newest allowed version
#   scripts/lock.sh --upgrade                # move everything (review the diff)
#
# torch: the lock pins the CPU build (torch==2.13.0+cpu), which pip finds on this project's machines
# (pip's find-links names the folder that holds the wheel). Where pip can see only PyPI's torch, the
# resolver would take the CUDA build and its nvidia-* packages; this script refuses such a lock.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.venv-lock
stamp=$tools/.installed
if [ ! -f "$stamp" ] || [ requirements/lock-tools.txt -nt "$stamp" ]; then
  rm -rf "$tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet -r requirements/lock-tools.txt
  touch "$stamp"
fi
# Compiled into a copy (pip-compile starts from the pins it finds there), which replaces the lock only
# when it differs: an unchanged lock keeps its time stamp, so `make setup` does not run again for it.
lock=requirements/dev.lock
draft=requirements/.dev.lock.draft
wheels=$(mktemp -d)
trap 'rm -f "$draft"; rm -rf "$wheels"' EXIT
if [ -f "$lock" ]; then cp "$lock" "$draft"; fi
"$tools/bin/pip" wheel --quiet --no-deps --wheel-dir "$wheels" ./client_sdk
# The header then names the command to run, not this script's internals.
export CUSTOM_COMPILE_COMMAND="make lock"
"$tools/bin/pip-compile" --quiet --no-config --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links --find-links "$wheels" \
  --extra dev --extra demo \
  --constraint requirements/constraints.txt \
  --output-file "$draft" \
  "$@" client_sdk/pyproject.toml server/pyproject.toml
if cmp -s "$draft" "$lock"; then
  echo "$lock: unchanged"
else
  mv "$draft" "$lock"
  echo "$lock: rewritten"
fi
python3 scripts/check_lock.py --lock-only
