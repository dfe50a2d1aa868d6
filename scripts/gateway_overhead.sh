#!/usr/bin/env bash
# The gateway's cost under load: the 16-client run of scripts/load_test.py against a build
# without the gateway (BASE, e.g. an older checkout's target/release/edgeinfer), this build
# with its defaults (loopback, no keys: the ledger still records every request), and this
# build with keys, limits and the ledger on (a master key, a key with generous TPM/RPM
# windows, a global window, prices), interleaved, a fresh server per run.
#
#   scripts/gateway_overhead.sh BASE_BIN [NEW_BIN] [PAIRS]
set -euo pipefail
base=${1:?usage: gateway_overhead.sh BASE_BIN [NEW_BIN] [PAIRS]}
new=${2:-target/release/edgeinfer}
pairs=${3:-2}
model=${EDGEINFER_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
port=${PORT:-8091}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
master=sk-master-overhead-0123456789
echo '{"*": {"input": 0.15, "cached_input": 0.075, "output": 0.6}}' >"$work/prices.json"

wait_ready() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && return 0
    sleep 0.1
  done
  echo "server did not start" >&2
  return 1
}

run() { # label, then the server command
  local label=$1
  shift
  "$@" --model "$model" --port "$port" >"$work/server.log" 2>&1 &
  local pid=$!
  wait_ready
  local key_args=()
  if [ "$label" = gateway ]; then
    key=$(curl -sf "http://127.0.0.1:$port/key/generate" -H "authorization: Bearer $master" \
      -d '{"key_alias": "load", "tpm_limit": 100000000, "rpm_limit": 1000000}' |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])')
    key_args=(--api-key "$key")
  fi
  echo "== $label"
  python3 scripts/load_test.py --url "http://127.0.0.1:$port" --concurrency 16 --requests 2 "${key_args[@]}"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

for i in $(seq "$pairs"); do
  run base "$base" serve
  rm -f "$work"/db*
  run plain "$new" serve --db "$work/db"
  rm -f "$work"/db*
  run gateway "$new" serve --master-key "$master" --db "$work/db" --prices "$work/prices.json" \
    --tpm-limit 100000000 --rpm-limit 1000000
done
