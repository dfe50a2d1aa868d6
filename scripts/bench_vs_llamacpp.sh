#!/usr/bin/env bash
# edgeinfer beside llama.cpp on this machine, interleaved, printing each pair's ratio:
# prompt (500 tokens) and generation (128 tokens) speed with 2 threads on the default model and
# on synthetic Llama-3.2-1B / Llama-3.1-8B Q4_K_M files (`edgeinfer synth`, written once into
# models/synth/), plus a read-bandwidth probe (the ceiling for single-stream decode).
#
#   scripts/bench_vs_llamacpp.sh LLAMA_BIN_DIR [PAIRS] [MODELS]
#
# LLAMA_BIN_DIR holds llama-bench (a CMake Release build of llama.cpp, e.g. the one vendored in
# the PyPI sdist llama_cpp_python==0.3.36, built outside this repository). On CPUs with AMX,
# llama.cpp's native build takes its AMX path, which crashed in prompt processing on our
# machines; the README's run used, in vendor/llama.cpp:
#   cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
#     -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
#     -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON \
#     -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
#   cmake --build build -j2 --target llama-bench llama-server llama-quantize
# For CPUs without AVX-512, compare our AVX2 kernels (`EDGEINFER_NO_AVX512=1 scripts/...`)
# with a build that stops at AVX2: the same line with -DGGML_AVX512=OFF and none of the
# AVX512 / AVX_VNNI flags (README, "CPUs without AVX-512"). MODELS is a
# comma-separated subset of default,1b,8b (default: all three). Only the ratios mean anything
# on a shared host: each pair runs back to back.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: bench_vs_llamacpp.sh LLAMA_BIN_DIR [PAIRS] [MODELS]}
pairs=${2:-3}
models=${3:-default,1b,8b}
threads=${THREADS:-2}
bin=target/release/edgeinfer
[ -x "$bin" ] || cargo build --release
[ -x "$llama/llama-bench" ] || { echo "no llama-bench in $llama" >&2; exit 1; }
mkdir -p models/synth
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 500 tokens of prompt text (the README's random-word generator, one word per token).
python3 -c "import random; random.seed(1); w='the quick brown fox jumps over lazy dog river mountain city people history science music water light energy system network model data value time world'.split(); print(' '.join(random.choice(w) for _ in range(499)))" >"$work/p500.txt"

file_of() {
  case $1 in
    default) "$bin" pull >/dev/null && echo models/SmolLM2-135M-Instruct.Q4_1.gguf ;;
    1b) f=models/synth/llama-3.2-1b.q4_k_m.gguf
      [ -f $f ] || "$bin" synth --shape llama-3.2-1b --quant q4_k_m --out $f >&2
      echo $f ;;
    8b) f=models/synth/llama-3.1-8b.q4_k_m.gguf
      [ -f $f ] || "$bin" synth --shape llama-3.1-8b --quant q4_k_m --out $f >&2
      echo $f ;;
  esac
}

# tok/s from edgeinfer's timing line: field 1 = prompt, 2 = generation.
ours() { # file, prompt, n, field
  "$bin" --threads "$threads" generate --raw -m "$1" -p "$2" -n "$3" 2>&1 >/dev/null |
    sed -n 's/^prompt: \([0-9]*\) tokens, \([0-9.]*\) tok\/s | generation: \([0-9]*\) tokens, \([0-9.]*\) tok\/s.*/\2 \4/p' |
    cut -d' ' -f"$4"
}

theirs() { # file, -p N, -n N
  "$llama/llama-bench" -m "$1" -t "$threads" -p "$2" -n "$3" -r 1 -o json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["avg_ts"])'
}

# Read bandwidth with $threads threads: sum a 1 GiB array (the bound of a decode step that
# reads every weight once).
cat >"$work/bw.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
int main(void) {
  size_t n = (size_t)1 << 28; float *a = malloc(n * sizeof *a);
  for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
  double best = 0;
  for (int r = 0; r < 5; r++) {
    double t = omp_get_wtime();
    float s = 0;
    #pragma omp parallel for reduction(+:s)
    for (size_t i = 0; i < n; i++) s += a[i];
    t = omp_get_wtime() - t;
    if (n * 4 / t / 1e9 > best) best = n * 4 / t / 1e9;
    if (s < 0) printf("%f", s);
  }
  printf("%.1f\n", best);
  return 0;
}
C
cc -O3 -march=native -ffast-math -fopenmp "$work/bw.c" -o "$work/bw"

echo "date: $(date -u +%F), $(nproc) cores, $threads threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for m in ${models//,/ }; do
  f=$(file_of "$m")
  # Bytes a decode step reads: the file, less an untied embedding (one row a token).
  mib=$(( $(stat -c %s "$f") / 1048576 ))
  [ "$m" = 8b ] && mib=$(( mib - 49152 * 4096 * 144 / 256 / 1048576 ))
  n=128
  [ "$m" = 8b ] && n=32
  for i in $(seq "$pairs"); do
    op=$(ours "$f" "$(cat "$work/p500.txt")" 1 1)
    tp=$(theirs "$f" 500 0)
    og=$(ours "$f" "The capital of France is" "$n" 2)
    tg=$(theirs "$f" 0 "$n")
    bw=$(OMP_NUM_THREADS=$threads "$work/bw")
    python3 - "$m" "$i" "$op" "$tp" "$og" "$tg" "$bw" "$mib" <<'PY'
import sys
m, i, op, tp, og, tg, bw, mib = sys.argv[1:]
op, tp, og, tg, bw, mib = map(float, (op, tp, og, tg, bw, mib))
ceiling = bw * 1e9 / (mib * 1048576)
print(f"{m:7} pair {i}: prompt {op:7.1f} vs {tp:7.1f} tok/s = {op / tp:4.2f}x | "
      f"generation {og:6.1f} vs {tg:6.1f} tok/s = {og / tg:4.2f}x | "
      f"read {bw:.1f} GB/s: ceiling {ceiling:.1f} tok/s, ours {og / ceiling:.0%}, theirs {tg / ceiling:.0%}")
PY
  done
done
