#!/usr/bin/env bash
# Lints the container files without a Docker engine: hadolint on the Dockerfile (warnings fail), and the
# compose file against the compose-spec JSON schema that check-jsonschema vendors (no network needed).
# BIN names the folder holding hadolint and check-jsonschema (default .venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-.venv/bin}
"$bin/hadolint" --version
"$bin/hadolint" --no-color --failure-threshold warning Dockerfile
echo "Dockerfile: hadolint clean at warning level"
"$bin/check-jsonschema" --version
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
