#!/usr/bin/env bash
# Embeddings side by side: `edgeinfer serve` and llama.cpp's `llama-server --embeddings
# --pooling mean` on the default model, `scripts/embed_load.py` (4 clients, 16 passages of
# about 64 tokens a request) against each in turn, N interleaved pairs, printing each
# pair's ratio of prompt tokens embedded per second; then both servers up together, the
# cosine similarity of their vectors for a fixed set of texts. Only ratios from one run
# mean anything on a shared host.
#
#   scripts/embed_vs_llamacpp.sh LLAMA_BIN_DIR [PAIRS]
#
# llama-server runs with 2 threads and one slot (`-t 2 -np 1`): more slots do not change
# its throughput here, and with several slots its vectors depend on the inputs batched
# beside them. llama.cpp is built as scripts/bench_vs_llamacpp.sh's header says.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: $0 LLAMA_BIN_DIR [PAIRS]}
pairs=${2:-3}
bin=target/release/edgeinfer
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -x "$bin" ] || cargo build --release
[ -f "$model" ] || scripts/download_model.sh

wait_up() {
  for _ in $(seq 240); do
    curl -sf "$1" >/dev/null && return 0
    sleep 0.5
  done
  echo "no answer from $1" >&2
  return 1
}

load() { # port -> prompt tokens/s
  python3 scripts/embed_load.py --url "http://127.0.0.1:$1" --concurrency 4 --requests 4 --batch 16 |
    tee -a /tmp/embed_vs_llamacpp.log |
    python3 -c 'import json, sys; d = json.loads(sys.stdin.readline()); assert d["errors"] == 0, d; print(d["tokens_per_s"])'
}

start_edgeinfer() { "$bin" --threads 2 serve --port 8095 >/tmp/embed_vs_edgeinfer.log 2>&1 & echo $!; }
start_llamacpp() {
  "$llama/llama-server" -m "$model" --embeddings --pooling mean -t 2 -np 1 -c 4096 --port 8096 \
    >/tmp/embed_vs_llama.log 2>&1 &
  echo $!
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

echo "date: $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for i in $(seq "$pairs"); do
  p=$(start_edgeinfer); wait_up http://127.0.0.1:8095/ready; ours=$(load 8095); stop "$p"
  p=$(start_llamacpp); wait_up http://127.0.0.1:8096/health; theirs=$(load 8096); stop "$p"
  echo "pair $i: edgeinfer $ours vs llama-server $theirs prompt tok/s = $(python3 -c "print(f'{$ours / $theirs:.2f}x')")"
done
a=$(start_edgeinfer); b=$(start_llamacpp)
wait_up http://127.0.0.1:8095/ready; wait_up http://127.0.0.1:8096/health
python3 scripts/embed_load.py --url http://127.0.0.1:8095 --compare http://127.0.0.1:8096
stop "$a"; stop "$b"
