#!/usr/bin/env bash
# The compatibility job: builds each environment of requirements/compat/ (or those named as arguments)
# in .venv-compat/NAME, installs paramsel into it with a plain `pip install` (nothing overridden) of its
# two distributions, paramsel-client (client_sdk/) and paramsel (server/), checks that pip kept the
# environment's own pins, and runs the test suite there, the differential tests against the real
# FL4Health 0.4.2 included.
#
# An environment is its file: `# python: X.Y` picks the interpreter (pyenv's newest X.Y, else
# pythonX.Y on PATH), the requirement lines are installed first, as a user's environment would already
# be, and `# oracle: target` puts FL4Health beside it in a side folder where its declared constraints
# cannot be met (see requirements/oracle.txt). An environment is rebuilt when its file, the test tools,
# the oracle list or either distribution's pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
envs=("$@")
if [ ${#envs[@]} -eq 0 ]; then
  for spec in requirements/compat/*-py3*.txt; do envs+=("$(basename "$spec" .txt)"); done
fi

interpreter() {  # the newest pyenv Python of version $1, else pythonX.Y on PATH
  if command -v pyenv >/dev/null && latest=$(pyenv latest "$1" 2>/dev/null); then
    echo "$(pyenv root)/versions/$latest/bin/python"
  else
    command -v "python$1"
  fi
}

build() {  # $1 = name; leaves the environment in .venv-compat/$1
  local name=$1 spec=requirements/compat/$1.txt venv=.venv-compat/$1
  local version oracle stamp
  version=$(sed -n 's/^# python: *//p' "$spec")
  oracle=$(sed -n 's/^# oracle: *//p' "$spec")
  stamp=$venv/.installed
  if [ -f "$stamp" ] && [ -z "$(find "$spec" requirements/compat/test-tools.txt requirements/oracle.txt \
    scripts/oracle_missing.py client_sdk/pyproject.toml server/pyproject.toml -newer "$stamp")" ]; then
    echo "== $name: up to date"
  else
    echo "== $name: building with Python $version"
    rm -rf "$venv"
    "$(interpreter "$version")" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # The user's environment as it stands before paramsel arrives...
    "$venv/bin/pip" install --quiet -r "$spec"
    "$venv/bin/pip" freeze --exclude-editable > "$venv/before.txt"
    # ...then paramsel by a plain install of both folders (paramsel requires paramsel-client, which no
    # package index has; the test tools ride along), held to the versions already there: a pip
    # that had to move any of them would fail here, not override. Not the demo extra: the demo is a
    # Flower App on flwr 1.41 and Ray, and tests/demo runs in the main job only.
    "$venv/bin/pip" install --quiet -c "$venv/before.txt" ./client_sdk ./server \
      -r requirements/compat/test-tools.txt
    "$venv/bin/pip" check
    if [ "$oracle" = target ]; then
      "$venv/bin/pip" install --quiet --no-deps --ignore-requires-python --target "$venv/oracle" \
        -r requirements/oracle.txt
      # Where the environment has no flwr (numpy below flwr 1.18's floor), the oracle's flwr still has
      # to import: its dependencies the environment lacks go into the folder too, held to the
      # environment's versions of anything they share, so nothing there shadows a different version.
      "$venv/bin/python" scripts/oracle_missing.py "$venv/oracle" flwr > "$venv/oracle-missing.txt"
      if [ -s "$venv/oracle-missing.txt" ]; then
        "$venv/bin/pip" freeze --exclude-editable > "$venv/after.txt"
        "$venv/bin/pip" install --quiet --target "$venv/oracle" -c "$venv/after.txt" \
          -r "$venv/oracle-missing.txt"
      fi
    fi
    touch "$stamp"
  fi
}

run() {  # $1 = name: the suite, then the differential tests with FL4Health importable
  local name=$1 venv=.venv-compat/$1 py oracle_path= status=0
  py=$root/$venv/bin/python
  [ -d "$venv/oracle" ] && oracle_path=$root/$venv/oracle
  # The environment is kept between runs, but paramsel is always this checkout's (its dependencies
  # were installed by the plain install when the environment was built).
  "$py" -m pip install --quiet --no-deps --force-reinstall ./client_sdk ./server || return 1
  "$py" - <<'PY'
import importlib.metadata as md, platform
names = ["numpy", "protobuf", "grpcio", "grpcio-health-checking", "flwr", "torch", "paramsel-client", "paramsel"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print(f"   python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names))
PY
  # From outside the checkout, so that `paramsel` is the installed package, not the source tree.
  # tests/flower runs the Flower example, and tests/demo and tests/test_compose_processes.py the demo's
  # Flower App, which need flwr 1.41 (absent beside FL4Health's 1.18), and the demo Ray and the app itself; contract, container,
  # Kubernetes and Node.js checks are about files and tools, not the Python environment, and run in
  # the main job.
  (cd "$venv" && "$py" -m pytest "$root/tests" -p no:cacheprovider -q --rootdir "$root" \
    -c "$root/pyproject.toml" --ignore="$root/tests/differential" --ignore="$root/tests/flower" \
    --ignore="$root/tests/demo" --ignore="$root/tests/test_compose_processes.py" \
    --ignore="$root/tests/test_contract.py" \
    --ignore="$root/tests/test_container_files.py" --ignore="$root/tests/test_node_client.py" \
    --ignore="$root/tests/test_kubernetes_manifests.py") || status=1
  (cd "$venv" && PYTHONPATH=$oracle_path PARAMSEL_REQUIRE_ORACLE=1 "$py" -m pytest "$root/tests/differential" \
    -p no:cacheprovider -q --rootdir "$root" -c "$root/pyproject.toml") || status=1
  return $status
}

for name in "${envs[@]}"; do build "$name"; done
failed=()
for name in "${envs[@]}"; do
  echo "== $name: tests"
  run "$name" || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== compatibility job failed in: ${failed[*]}" >&2
  exit 1
fi
echo "== compatibility job passed in: ${envs[*]}"
