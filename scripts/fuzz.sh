#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each, or for RUNS
# executions with `--runs N`, on the stable toolchain (no sanitizer). New inputs go to
# fuzz/work/TARGET (ignored by git); the committed seeds in fuzz/corpus/TARGET are read.
# A crash stops with its input in fuzz/artifacts/TARGET and a non-zero exit.
#
#   scripts/fuzz.sh                      # 60 s each
#   scripts/fuzz.sh 30 gguf_header       # one target, 30 s
#   scripts/fuzz.sh --runs 10000000 gguf_header
set -euo pipefail
cd "$(dirname "$0")/.."

limit="-max_total_time=${1:-60}"
if [ "${1:-}" = "--runs" ]; then
  limit="-runs=$2"
  shift 2
elif [ $# -gt 0 ]; then
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_header chat_request tokenizer_roundtrip sse_encoder gbnf)

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.1
fi
# tokenizer_roundtrip reads the default model's tokenizer.
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/download_model.sh

cargo fuzz build --sanitizer none
for t in "${targets[@]}"; do
  mkdir -p "fuzz/work/$t"
  log="fuzz/work/$t.log"
  echo "== $t ($limit)"
  if ! cargo fuzz run --sanitizer none "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
      "$limit" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "FUZZ FAIL: $t (input in fuzz/artifacts/$t)"
    exit 1
  fi
  grep -E "^Done [0-9]+ runs|stat::number_of_executed_units" "$log" | tail -2
done
echo "FUZZ OK: ${targets[*]}"
