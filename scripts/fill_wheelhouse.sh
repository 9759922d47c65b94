#!/usr/bin/env bash
# Fills wheelhouse/ (part of the Docker build context) with every wheel the two images install, so that
# `docker build` needs no network (the Dockerfile then installs with --no-index --find-links):
#   - CPU torch at requirements/dev.lock's version: what this machine's pip configuration offers first
#     (its find-links folder, where these machines keep the wheel), else PyTorch's CPU index;
#   - paramsel[demo]'s requirements (paramsel-client's among them) and torch's, at the lock's versions,
#     and the build backend (setuptools) that `pip wheel ./client_sdk ./server` needs inside the build;
# all for the image's Python (the version in the Dockerfile's FROM) on manylinux x86_64, binary only.
# The folder then holds exactly this set (older wheels go). A stamp of the inputs (the lock, the two
# distributions' pyproject.toml files, the FROM line) skips all of it when nothing changed.
#
#   scripts/fill_wheelhouse.sh          PYTHON: the interpreter whose pip downloads (default .venv's)
#   rm wheelhouse/*.whl                 back to installing from the indexes
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
lock=requirements/dev.lock
house=wheelhouse
python_version=$(sed -n 's/^FROM python:\([0-9]*\.[0-9]*\)-.*/\1/p' Dockerfile | head -n 1)
[ -n "$python_version" ] || {
    echo "fill_wheelhouse: no FROM python:X.Y-... in the Dockerfile" >&2
    exit 1
}
torch=$(grep -E '^torch==' "$lock") || {
    echo "fill_wheelhouse: no torch== in $lock" >&2
    exit 1
}

stamp=$(cat "$lock" client_sdk/pyproject.toml server/pyproject.toml <(grep '^FROM ' Dockerfile) | sha256sum | cut -d' ' -f1)
if [ -f "$house/.stamp" ] && [ "$(cat "$house/.stamp")" = "$stamp" ] && ls "$house"/torch-*.whl >/dev/null 2>&1; then
    echo "wheelhouse: up to date ($(find "$house" -name '*.whl' | wc -l) wheels, $(du -sh "$house" | cut -f1))"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The base image is Debian 12 (glibc 2.36): every manylinux tag up to 2_36, named one by one (pip 23
# does not extend --platform manylinux_2_28 to the older tags).
target=(--only-binary=:all: --implementation cp --python-version "$python_version" --abi "cp${python_version/./}")
for glibc in $(seq 5 36); do target+=(--platform "manylinux_2_${glibc}_x86_64"); done
target+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
quiet=(--quiet --disable-pip-version-check)

# paramsel's own wheels only tell pip their requirements (the server's names paramsel-client, found
# beside it); the image builds its own from the sources. The server's is built here without its C
# module (a copy of the folder, its ext-modules table taken out): with it, the wheel is tagged for
# this machine (linux_x86_64), which the manylinux platforms below refuse; the requirements are the same.
cp -rL server "$tmp/server"
find "$tmp/server" \( -name '*.so' -o -name build -o -name '*.egg-info' \) -prune -exec rm -rf {} +
sed -i '/^\[\[tool\.setuptools\.ext-modules\]\]/,/^optional = true/d' "$tmp/server/pyproject.toml"
"$py" -m pip wheel "${quiet[@]}" --no-deps --wheel-dir "$tmp/paramsel" ./client_sdk "$tmp/server"
paramsel_wheel=$(echo "$tmp"/paramsel/paramsel-*.whl)

mkdir -p "$tmp/wheels"
if ! "$py" -m pip download "${quiet[@]}" --no-deps "${target[@]}" --find-links "$house" --dest "$tmp/wheels" "$torch" 2>/dev/null; then
    echo "wheelhouse: $torch is not on this machine's pip configuration: PyTorch's CPU index"
    "$py" -m pip download "${quiet[@]}" --no-deps "${target[@]}" --index-url https://download.pytorch.org/whl/cpu \
        --dest "$tmp/wheels" "$torch"
fi
status=0
"$py" -m pip download "${quiet[@]}" "${target[@]}" --find-links "$tmp/paramsel" --find-links "$tmp/wheels" --find-links "$house" \
    --constraint "$lock" --dest "$tmp/wheels" "${paramsel_wheel}[demo]" "setuptools>=77.0.1" 2>"$tmp/pip.log" \
    || status=$?
# (This machine's pip configuration names index folders that lack most projects: pip warns per project.)
grep -v "^WARNING: Location 'file:" "$tmp/pip.log" >&2 || true
[ $status = 0 ] || exit $status
rm -f "$tmp"/wheels/paramsel-*.whl "$tmp"/wheels/paramsel_client-*.whl
ls "$tmp"/wheels/torch-*.whl >/dev/null

mkdir -p "$house"
find "$house" -maxdepth 1 -name '*.whl' -delete
mv "$tmp"/wheels/*.whl "$house"/
echo "$stamp" >"$house/.stamp"
echo "wheelhouse: $(find "$house" -name '*.whl' | wc -l) wheels, $(du -sh "$house" | cut -f1) (python $python_version, $torch)"
