#!/usr/bin/env bash
# CI's container job (make compose-demo), for a Debian 12 machine with no Docker and no Docker Hub:
#
#  1. an engine of its own (scripts/docker_engine.sh: Debian 13's moby and Compose v2, cached in
#     .docker-ci/), started here and ALWAYS stopped by the trap, which also removes what it made and
#     verifies the host's links, iptables and sysctls are as before; the engine and Compose versions are
#     checked against the compose file's x-requires;
#  2. the Dockerfile's base image: pulled if the registry answers, else a stand-in built here (debootstrap
#     bookworm minbase + python3, python3-venv, python3-pip, python-is-python3, ca-certificates, imported
#     under the FROM name; Debian 12's python3 is 3.11), so the same Dockerfile serves both kinds of
#     machine; the rootfs tarball is cached;
#  3. the wheelhouse (scripts/fill_wheelhouse.sh), then every image the compose file names, built from
#     its build section with --network none: the build needs no network;
#  4. smoke tests of the images: `docker run IMAGE --help` and `docker run IMAGE paramsel --help`, the
#     server image without the demo's packages and with CPU-only torch, running as a non-root user;
#  5. `docker compose up` of the demo, then the checks of scripts/compose_check.py: every job (label
#     paramsel.ci.role=job) exits 0, every service stays up and its health check passes, every container
#     exits 0 at `compose stop`; the figures in the bind-mounted output folder, after `compose down`;
#  6. a self-test of those checks on two broken copies of the compose file, with the same images and
#     daemon: a job that exits 1, and no output volume. Each must be caught, for the expected reason.
#
# Exit status 0 when all of it holds. Times of each step are printed, then the images' sizes.
#   scripts/compose_ci.sh                  root: it starts dockerd, debootstrap, apt-get
#   PARAMSEL_CI_SELFTEST=0 ...             skip step 6
#   PARAMSEL_CI_ENGINE=current ...         use the engine DOCKER_HOST names instead of one of its own
#                                          (no install, no start or stop, no host checks)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
if [ "${PARAMSEL_CI_ENGINE:-own}" = own ] && [ "$(id -u)" != 0 ]; then
    echo "compose_ci: needs root (it starts dockerd, runs debootstrap and apt-get); or PARAMSEL_CI_ENGINE=current" >&2
    exit 1
fi
dir=${PARAMSEL_DOCKER_DIR:-$repo/.docker-ci}
export PARAMSEL_DOCKER_DIR=$dir
engine_mode=${PARAMSEL_CI_ENGINE:-own}
out=$dir/out/demo-output
logs=$dir/out/logs
py=${PYTHON:-python3}
check=("$py" scripts/compose_check.py)
started_at=$SECONDS
projects=()

step() { printf '\n== [%3d s] %s\n' $((SECONDS - started_at)) "$*"; }

cleanup() {
    local status=$?
    set +e
    for project in "${projects[@]}"; do
        COMPOSE_PROJECT_NAME=$project docker compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
    done
    if [ "$engine_mode" = own ]; then
        step "stopping the engine and verifying the host is as before"
        scripts/docker_engine.sh stop || status=1
    fi
    printf '\n== [%3d s] compose_ci: %s\n' $((SECONDS - started_at)) "$([ $status = 0 ] && echo OK || echo "FAILED ($status)")"
    exit $status
}

# ------------------------------------------------------------------------------------- 1. the engine
if [ "$engine_mode" = own ]; then
    step "engine: install (cached in $dir) and start"
    scripts/docker_engine.sh install
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    scripts/docker_engine.sh start
    eval "$(scripts/docker_engine.sh env)"
else
    trap cleanup EXIT
fi
mkdir -p "$logs"
docker version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}'
docker compose version
export COMPOSE_FILE=$repo/docker-compose.yml COMPOSE_PROJECT_NAME=paramsel-ci
export PARAMSEL_DEMO_OUT=$out
"${check[@]}" versions

# ------------------------------------------------------------------------------------- 2. base image
standin_base() {
    local image=$1 version=$2 cache=$dir/base/${1//[:\/]/_}.tar
    if [ ! -f "$cache" ]; then
        step "base: $image is not reachable; a stand-in from debootstrap (Debian 12, python3 $version)"
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
        local rootfs=$dir/base/rootfs mirror
        mirror=$(scripts/docker_engine.sh mirror)
        rm -rf "$rootfs"
        mkdir -p "$rootfs"
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
            bookworm "$rootfs" "$mirror" >"$logs/debootstrap.log" 2>&1 \
            || { tail -n 20 "$logs/debootstrap.log" >&2; exit 1; }
        # As slim as Debian's slim images: no package lists, caches, docs, manuals or translations.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
            "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
            "$rootfs"/var/log/* "$rootfs"/tmp/*
        tar -C "$rootfs" -cf "$cache.tmp" .
        mv "$cache.tmp" "$cache"
        rm -rf "$rootfs"
    fi
    # An imported image has no ENV: PATH as the official image has it, and its LANG.
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --change "LABEL org.paramsel.standin=\"debootstrap bookworm minbase + python3 (scripts/compose_ci.sh)\"" \
        - "$image" <"$cache" >/dev/null
    local got
    got=$(docker run --rm --network none --entrypoint python "$image" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$got" = "$version" ] || {
        echo "compose_ci: the stand-in has Python $got, the Dockerfile wants $version ($image)" >&2
        exit 1
    }
}

step "base images of the Dockerfile"
stages=$(sed -n 's/^FROM .* AS \([^ ]*\).*/\1/ip' Dockerfile)
for image in $(sed -n 's/^FROM \([^ ]*\).*/\1/ip' Dockerfile | sort -u); do
    if grep -qxF "$image" <<<"$stages"; then continue; fi
    if docker image inspect "$image" >/dev/null 2>&1; then
        echo "$image: present ($(docker image inspect --format '{{index .Config.Labels "org.paramsel.standin"}}' "$image" | sed 's/^$/pulled/'))"
    elif timeout 120 docker pull --quiet "$image" >/dev/null 2>"$logs/pull.log"; then
        echo "$image: pulled"
    elif [[ $image =~ ^python:([0-9]+\.[0-9]+)-slim-bookworm$ ]]; then
        echo "$image: cannot pull ($(tail -n 1 "$logs/pull.log"))"
        standin_base "$image" "${BASH_REMATCH[1]}"
        echo "$image: stand-in imported"
    else
        echo "compose_ci: cannot pull $image and have no stand-in for it" >&2
        exit 1
    fi
done

# ------------------------------------------------------------------------------------- 3. images
step "wheelhouse (the build installs from it alone)"
PYTHON=${PYTHON:-} scripts/fill_wheelhouse.sh

step "images the compose file names, built with --network none"
"$py" - >"$dir/out/builds.txt" <<'EOF'
import json, subprocess
config = json.loads(subprocess.run(["docker", "compose", "config", "--format", "json"], capture_output=True, text=True, check=True).stdout)
seen = set()
for service in config["services"].values():
    build = service.get("build")
    if build and service.get("image") and service["image"] not in seen:
        seen.add(service["image"])
        print(service["image"], build["context"], build.get("dockerfile", "Dockerfile"), build.get("target", ""))
EOF
images=()
while read -r image context dockerfile target; do
    images+=("$image")
    echo "-- $image (target ${target:-last}) from $context/$dockerfile"
    build_started=$SECONDS
    docker build --network none --file "$context/$dockerfile" ${target:+--target "$target"} --tag "$image" "$context" \
        >"$logs/build-${image//[:\/]/_}.log" 2>&1 || {
        tail -n 40 "$logs/build-${image//[:\/]/_}.log" >&2
        exit 1
    }
    echo "   built in $((SECONDS - build_started)) s: $(docker image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
done <"$dir/out/builds.txt"

# ------------------------------------------------------------------------------------- 4. smoke tests
step "images: entrypoint, user, contents"
for image in "${images[@]}"; do
    docker run --rm --network none "$image" --help | grep -q '^usage: paramsel' \
        || { echo "compose_ci: docker run $image --help" >&2; exit 1; }
    docker run --rm --network none "$image" paramsel --help | grep -q '^usage: paramsel' \
        || { echo "compose_ci: docker run $image paramsel --help" >&2; exit 1; }
    user=$(docker run --rm --network none --entrypoint id "$image" -u)
    [ "$user" != 0 ] || { echo "compose_ci: $image runs as root" >&2; exit 1; }
    echo "$image: --help and paramsel --help work; runs as uid $user"
done
server_image=$(docker compose config --format json | "$py" -c 'import json, sys; c = json.load(sys.stdin); print(next(s["image"] for s in c["services"].values() if s.get("build", {}).get("target") == "server"))')
docker run --rm --network none --entrypoint python "$server_image" -c '
import importlib.util, torch
extra_names = ("sklearn", "scipy", "matplotlib", "sympy", "networkx", "mpmath", "flwr", "ray")
extra = [m for m in extra_names if importlib.util.find_spec(m)]
assert not extra, f"the server image has {extra}"
assert torch.version.cuda is None, torch.version.cuda
print(f"server image: torch {torch.__version__} (CPU only), none of {extra_names}")'

# ------------------------------------------------------------------------------------- 5. the demo
# Demo run: its checks. (What the figures must say is the one part of this script that knows the demo:
# scripts/compose_check.py figures.)
run_project() {
    local project=$1 status=0
    projects+=("$project")
    export COMPOSE_PROJECT_NAME=$project
    local up_started=$SECONDS
    docker compose up --detach --no-build --pull never >"$logs/$project-up.log" 2>&1 || {
        cat "$logs/$project-up.log" >&2
        status=1
    }
    [ $status = 0 ] && echo "up: $((SECONDS - up_started)) s (the service healthy, the jobs started)"
    [ $status = 0 ] && { "${check[@]}" wait --timeout "${PARAMSEL_CI_RUN_TIMEOUT:-900}" || status=1; }
    docker compose logs --no-color --timestamps >"$logs/$project.log" 2>&1 || true
    if [ $status = 0 ]; then
        docker compose stop --timeout 30 >/dev/null 2>&1
        "${check[@]}" stopped || status=1
    fi
    docker compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || status=1
    [ -z "$(docker ps --all --quiet --filter "label=com.docker.compose.project=$project")" ] || status=1
    return $status
}

step "docker compose up: the demo (logs: $logs)"
rm -rf "$out"
mkdir -p "$out"
# The demo runs as the image's user 10001 (the compose default); a non-root caller runs it as
# itself instead, so that the figures are its own.
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$out"
else
    PARAMSEL_DEMO_USER="$(id -u):$(id -g)"
    export PARAMSEL_DEMO_USER
fi
demo_started=$SECONDS
run_project paramsel-ci || { echo "compose_ci: the demo run failed" >&2; exit 1; }
echo "demo: $((SECONDS - demo_started)) s up to down"
"${check[@]}" figures "$out"
grep -q "final held-out accuracy" "$logs/paramsel-ci.log" \
    || { echo "compose_ci: the demo did not report the final accuracy" >&2; exit 1; }
echo "outputs after compose down: $(find "$out" -mindepth 1 -printf '%f ')"

# ------------------------------------------------------------------------------------- 6. self-test
if [ "${PARAMSEL_CI_SELFTEST:-1}" = 1 ]; then
    step "self-test: the checks catch a broken compose file (copies in $dir/out)"
    docker compose config --format json >"$dir/out/resolved.json"
    expect_failure() {
        local kind=$1 reason=$2 copy=$dir/out/broken-$1.json selftest_started=$SECONDS
        "${check[@]}" break "$kind" "$dir/out/resolved.json" "$copy" --out "$out"
        local broken_out=$dir/out/broken-$kind-output
        rm -rf "$broken_out"
        mkdir -p "$broken_out"
        local result status=0
        result=$(
            export COMPOSE_FILE=$copy
            {
                run_project "paramsel-ci-$kind" && "${check[@]}" figures "$broken_out"
            } 2>&1
        ) || status=$?
        echo "$result" >"$logs/selftest-$kind.log"
        if [ $status = 0 ]; then
            echo "compose_ci: self-test $kind: the checks passed a broken compose file" >&2
            exit 1
        fi
        grep -q -- "$reason" <<<"$result" || {
            echo "$result" | tail -n 20 >&2
            echo "compose_ci: self-test $kind: failed, but not with \"$reason\"" >&2
            exit 1
        }
        echo "self-test $kind: caught in $((SECONDS - selftest_started)) s ($(grep -m1 -- "$reason" <<<"$result"))"
    }
    expect_failure job-fails "job exited 1"
    expect_failure no-output "figures.json is missing"
fi

step "sizes"
for image in "${images[@]}"; do
    docker image inspect --format "$image {{.Size}}" "$image" | awk '{ printf "%s: %.0f MB\n", $1, $2 / 1e6 }'
done
# The images of earlier builds, now untagged, would pile up in the kept data root.
docker image prune --force >/dev/null
