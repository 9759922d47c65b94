#!/usr/bin/env bash
# Fails when the committed bindings in client_sdk/paramsel/v1 are not what proto/ generates today.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
scripts/gen_proto.sh "$scratch"
if ! diff -r -x __pycache__ "$scratch/paramsel/v1" client_sdk/paramsel/v1; then
  echo "client_sdk/paramsel/v1 is stale: run 'make proto' and commit the result" >&2
  exit 1
fi
echo "stubs are up to date"
