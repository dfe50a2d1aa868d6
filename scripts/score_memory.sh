#!/usr/bin/env bash
# Peak memory and time of scoring one long prompt (echo + logprobs, as evaluation harnesses
# send), for each binary given, in interleaved rounds:
#   scripts/score_memory.sh ROUNDS BIN [BIN...]
# Each round starts `BIN serve` on the default model with --max-batch-tokens 2048, waits for
# /ready, sends one 2,000-token scoring request and prints the seconds it took and the
# process's VmHWM before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:?rounds}
shift
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
prompt=$(python3 -c "import random; random.seed(1); w=['river','stone','quiet','market','yellow','engine','garden','window','number','travel']; print(' '.join(random.choice(w) for _ in range(2000)))")
body=$(python3 -c "import json,sys; print(json.dumps({'prompt': sys.argv[1], 'echo': True, 'logprobs': 5, 'max_tokens': 0}))" "$prompt")
port=18190
for ((r = 1; r <= rounds; r++)); do
  for bin in "$@"; do
    data=$(mktemp -d)
    "$bin" serve -m "$model" --port "$port" --max-batch-tokens 2048 --data-dir "$data" >/dev/null 2>&1 &
    pid=$!
    until curl -sf "localhost:$port/ready" >/dev/null; do sleep 0.1; done
    before=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    t0=$(date +%s.%N)
    n=$(curl -sf "localhost:$port/v1/completions" -H 'content-type: application/json' -d "$body" |
      python3 -c "import json,sys; print(len(json.load(sys.stdin)['choices'][0]['logprobs']['tokens']))")
    t1=$(date +%s.%N)
    after=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$data"
    echo "round $r $bin: $n tokens scored in $(echo "$t1 - $t0" | bc) s; VmHWM $((before / 1024)) -> $((after / 1024)) MiB (+$(((after - before) / 1024)))"
  done
done
