#!/usr/bin/env bash
# Interactive traffic beside background work: does low priority keep a batch out of the
# interactive requests' way? Each round starts a fresh server, a background load of
# BG_CLIENTS streaming clients (more than --max-batch-size leaves room for), waits for it to
# fill the node, then measures FG_CLIENTS interactive clients (scripts/load_test.py), once with
# the background at `x-edgeinfer-priority: low` and once at `normal`, interleaved.
#
#   scripts/priority_probe.sh [BINARY] [ROUNDS]   (default target/release/edgeinfer, 3)
#
# SERVER_ARGS adds flags to each server (`--kv-cache-tokens 1024`: a KV cache the background
# fills before the places run out); PRIORITIES picks the background's priorities (default
# "low normal"); BEFORE=OLD_BINARY adds a run of an older build to each round, its background
# at the first of PRIORITIES.
# Prints one JSON line per run: the interactive report, labelled with the background's
# priority (and the binary, with BEFORE). BG_ARGS adds flags to the background's load_test.py
# (`--prompt-words 2000 --max-tokens 64`: long documents); BG_WARMUP, the seconds the
# background runs before the interactive clients start (3).
set -euo pipefail
BIN=${1:-target/release/edgeinfer}
ROUNDS=${2:-3}
PORT=${PORT:-8097}
BG_CLIENTS=${BG_CLIENTS:-24}
FG_CLIENTS=${FG_CLIENTS:-4}
read -r -a SERVER_ARGS <<<"${SERVER_ARGS:-}"
read -r -a PRIORITIES <<<"${PRIORITIES:-low normal}"
read -r -a BG_ARGS <<<"${BG_ARGS:-}"
URL="http://127.0.0.1:$PORT"
here=$(cd "$(dirname "$0")" && pwd)
data=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$data"' EXIT

run_one() {
  local priority=$1 bin=$3
  "$bin" serve --port "$PORT" --data-dir "$data/$priority-$2-$RANDOM" "${SERVER_ARGS[@]}" \
    >/dev/null 2>&1 &
  local server=$!
  until curl -sf "$URL/ready" >/dev/null; do sleep 0.2; done
  python3 "$here/load_test.py" --url "$URL" --concurrency "$BG_CLIENTS" --requests 50 \
    --priority "$priority" "${BG_ARGS[@]}" >/dev/null 2>&1 &
  local bg=$!
  sleep "${BG_WARMUP:-3}"
  local out
  out=$(python3 "$here/load_test.py" --url "$URL" --concurrency "$FG_CLIENTS" --requests 2)
  echo "{\"binary\": \"$bin\", \"background_priority\": \"$priority\", \"interactive\": $out}"
  kill "$bg" 2>/dev/null || true
  kill "$server"
  wait "$server" 2>/dev/null || true
  wait "$bg" 2>/dev/null || true
}

for r in $(seq "$ROUNDS"); do
  for priority in "${PRIORITIES[@]}"; do
    run_one "$priority" "$r" "$BIN"
  done
  if [ -n "${BEFORE:-}" ]; then
    run_one "${PRIORITIES[0]}" "$r" "$BEFORE"
  fi
done
