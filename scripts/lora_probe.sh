#!/usr/bin/env bash
# What a LoRA adapter costs: aggregate throughput of CLIENTS streaming clients
# (scripts/load_test.py) on the base model, on a random rank-RANK adapter of every linear layer
# (`edgeinfer synth --lora-for`), and half and half (two load_test.py runs side by side),
# each run on a fresh server with the adapter loaded, interleaved round by round.
#
#   scripts/lora_probe.sh [BINARY] [ROUNDS]   (default target/release/edgeinfer, 3)
#
# BEFORE=OLD_BINARY adds a base-model run of an older build (no --lora) to each round: what
# the adapter seam costs requests that use no adapter. MODEL (default: the default model's
# file), CLIENTS (16), REQUESTS per client (3), MAX_TOKENS (128), RANK (8), PORT (8098).
# Prints one JSON line per load_test.py run (two for a half-and-half run, one per half),
# labelled with the binary and what its clients asked for.
set -euo pipefail
BIN=${1:-target/release/edgeinfer}
ROUNDS=${2:-3}
PORT=${PORT:-8098}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
CLIENTS=${CLIENTS:-16}
REQUESTS=${REQUESTS:-3}
MAX_TOKENS=${MAX_TOKENS:-128}
RANK=${RANK:-8}
URL="http://127.0.0.1:$PORT"
here=$(cd "$(dirname "$0")" && pwd)
data=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$data"' EXIT
"$BIN" synth --lora-for "$MODEL" --rank "$RANK" --out "$data/tuned.gguf"
base=base

load() { # MODEL_NAME CLIENTS: the report's JSON line (a line of errors after it goes to stderr)
  python3 "$here/load_test.py" --url "$URL" --model "$1" --concurrency "$2" \
    --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" | {
    read -r report
    echo "$report"
    cat >&2
  }
}

run_one() { # BINARY WHAT [SERVER FLAGS...]
  local bin=$1 what=$2
  shift 2
  "$bin" serve --port "$PORT" --model "$MODEL" --served-model-name "$base" \
    --data-dir "$data/run-$RANDOM" "$@" >"$data/server.log" 2>&1 &
  local server=$!
  until curl -sf "$URL/ready" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { cat "$data/server.log" >&2; exit 1; }
    sleep 0.2
  done
  case $what in
    base) echo "{\"binary\": \"$bin\", \"clients\": \"base\", \"report\": $(load "$base" "$CLIENTS")}" ;;
    tuned) echo "{\"binary\": \"$bin\", \"clients\": \"tuned\", \"report\": $(load tuned "$CLIENTS")}" ;;
    mixed)
      load "$base" $((CLIENTS / 2)) >"$data/a.json" &
      load tuned $((CLIENTS / 2)) >"$data/b.json"
      wait $!
      echo "{\"binary\": \"$bin\", \"clients\": \"half base\", \"report\": $(cat "$data/a.json")}"
      echo "{\"binary\": \"$bin\", \"clients\": \"half tuned\", \"report\": $(cat "$data/b.json")}"
      ;;
  esac
  kill "$server"
  wait "$server" 2>/dev/null || true
}

for _ in $(seq "$ROUNDS"); do
  if [ -n "${BEFORE:-}" ]; then
    run_one "$BEFORE" base
  fi
  for what in base tuned mixed; do
    run_one "$BIN" "$what" --lora "tuned=$data/tuned.gguf"
  done
done
