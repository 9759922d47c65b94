#!/usr/bin/env bash
# The FL4Health-style example: start `paramsel serve` as its own process, then run the FL4Health-style federated
# example client against it (PARAMSEL_TARGET), then stop the server with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
.venv/bin/paramsel serve --host 127.0.0.1 --port 0 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
  target=$(sed -n 's/^paramsel serving on \(.*\)$/\1/p' "$log")
  [ -n "$target" ] && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$target" ] || { echo "paramsel serve did not start" >&2; cat "$log"; exit 1; }
echo "paramsel serve is up at $target"
PARAMSEL_TARGET=$target .venv/bin/python examples/fl4health_client/client.py "$@"
