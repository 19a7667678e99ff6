#!/usr/bin/env bash
# Gateway overhead with the gateway off the backend's CPU, as in the Kubernetes layout
# (its own pods): encoder, index shards and Redis on CPU 0; the gateway and the load
# generator on CPU 1. Check and direct-check then give the backend the same core, and
# the gateway's work competes only with the client's, never with the encoder's.
#
#   bash benchmarks/load_pinned.sh [IMAGES] [extra copyfree load args...]
#
# Needs 2+ CPUs and taskset (util-linux). Writes artifacts/load/pinned.json.
set -euo pipefail
cd "$(dirname "$0")/.."
images="${1:-../shared/datasets/dev}"
shift || true
bin=.venv/bin
data=.copyfree/load-pinned
port_base="${PORT_BASE:-51050}"
gateway="127.0.0.1:${port_base}"
encoder="127.0.0.1:$((port_base + 1))"

command -v taskset >/dev/null || { echo "taskset not found (util-linux)" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs, this machine has $(nproc)" >&2; exit 1; }

rm -rf "$data"
"$bin/copyfree" serve --shards 2 --data-dir "$data" --gateway-port "$port_base" \
  --encoder-port "$((port_base + 1))" --index-base-port "$((port_base + 11))" \
  >"$data.log" 2>&1 &
serve=$!
trap 'kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null || true' EXIT

for _ in $(seq 120); do
  grep -q "copyfree serving" "$data.log" 2>/dev/null && break
  kill -0 "$serve" 2>/dev/null || { cat "$data.log" >&2; exit 1; }
  sleep 1
done
grep -q "copyfree serving" "$data.log" || { echo "stack did not start" >&2; exit 1; }

"$bin/copyfree" register "$images" --gateway "$gateway" --collection registry \
  --kind registry --limit 1000
"$bin/copyfree" register "$images" --gateway "$gateway" --collection copyright-free \
  --kind copyright-free --offset 1000 --limit 2000

# The stack's children: pin every thread of each (-a) by its role.
for pid in $(pgrep -P "$serve"); do
  case "$(tr '\0' ' ' <"/proc/$pid/cmdline")" in
    *copyfree_gateway*) taskset -a -pc 1 "$pid" >/dev/null ;;
    *) taskset -a -pc 0 "$pid" >/dev/null ;;
  esac
done
echo "pinned: gateway on CPU 1, encoder/index/redis on CPU 0, load generator on CPU 1"

mkdir -p artifacts/load
taskset -c 1 "$bin/copyfree" load --images "$images" --gateway "$gateway" \
  --encoder "$encoder" \
  --index "127.0.0.1:$((port_base + 11)),127.0.0.1:$((port_base + 12))" \
  --payloads 64 --call check,direct-check -c 1,8,32 -z 7 --rounds 4 \
  --json artifacts/load/pinned.json "$@"
