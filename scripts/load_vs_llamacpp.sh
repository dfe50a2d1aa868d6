#!/usr/bin/env bash
# The server side by side: `edgeinfer serve` and llama.cpp's `llama-server` on the default
# model, `scripts/load_test.py` at 16 streaming clients against each in turn, N interleaved
# pairs, printing each pair's aggregate ratio. Only ratios from one run mean anything on a
# shared host.
#
#   scripts/load_vs_llamacpp.sh LLAMA_BIN_DIR [PAIRS] [CONCURRENCY]
#
# BEFORE=path/to/an/older/edgeinfer adds that binary to each pair (a before/after run).
# llama-server runs with 2 threads, 16 slots and continuous batching (`-t 2 -np 16 -cb`,
# a 16384-token context shared by the slots); llama.cpp is built as
# scripts/bench_vs_llamacpp.sh's header says.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: $0 LLAMA_BIN_DIR [PAIRS] [CONCURRENCY]}
pairs=${2:-3}
conc=${3:-16}
bin=target/release/edgeinfer
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -x "$bin" ] || cargo build --release
[ -f "$model" ] || scripts/download_model.sh

wait_up() { # URL [FALLBACK_URL: asked while URL answers 404, for builds before /ready]
  local code
  for _ in $(seq 240); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$1") || true
    [ "$code" = 200 ] && return 0
    [ "$code" = 404 ] && [ -n "${2:-}" ] && curl -sf "$2" >/dev/null && return 0
    sleep 0.5
  done
  echo "no answer from $1" >&2
  return 1
}

# Prints the aggregate tok/s of one load run against the server on port $1.
load() {
  python3 scripts/load_test.py --url "http://127.0.0.1:$1" --concurrency "$conc" --requests 2 |
    tee -a /tmp/load_vs_llamacpp.log |
    python3 -c 'import json, sys; print(json.loads(sys.stdin.readline())["aggregate_tok_s"])'
}

edgeinfer() { # binary -> aggregate tok/s
  "$1" --threads 2 serve --port 8095 >/tmp/load_vs_edgeinfer.log 2>&1 &
  local p=$!
  wait_up http://127.0.0.1:8095/ready http://127.0.0.1:8095/health
  load 8095
  kill "$p"
  wait "$p" 2>/dev/null || true
}

llamacpp() {
  "$llama/llama-server" -m "$model" -t 2 -c 16384 -np 16 -cb --port 8096 >/tmp/load_vs_llama.log 2>&1 &
  local p=$!
  wait_up http://127.0.0.1:8096/health
  load 8096
  kill "$p"
  wait "$p" 2>/dev/null || true
}

echo "date: $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $conc clients"
for i in $(seq "$pairs"); do
  ours=$(edgeinfer "$bin")
  theirs=$(llamacpp)
  line="pair $i: edgeinfer $ours vs llama-server $theirs tok/s = $(python3 -c "print(f'{$ours / $theirs:.2f}x')")"
  if [ -n "${BEFORE:-}" ]; then
    before=$(edgeinfer "$BEFORE")
    line="$line | before $before tok/s: after/before $(python3 -c "print(f'{$ours / $before:.2f}x')")"
  fi
  echo "$line"
done
