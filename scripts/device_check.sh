#!/usr/bin/env bash
# The CUDA backend's device check, in two halves.
#
#   scripts/device_check.sh prepare     # here, on a machine without a GPU
#   scripts/device_check.sh run [OUT]   # on the GPU machine, with no network
#
# prepare: builds `--features cuda` with scripts/build_cuda.sh, and puts into .devcheck/
# (ignored by git; carry it to the GPU machine) the stripped, compressed binary and a
# vocabulary-only donor GGUF (the default model's tokenizer and template, no tensors).
#
# run: writes two synthetic models with `edgeinfer synth` (a 2-layer and a full 32-layer
# Llama-3.1-8B-shaped Q4_K_M file), then with `edgeinfer backend-check`:
#   1. CUDA logits against CPU logits on the 2-layer file (prefill and 16 greedy steps);
#   2. batching invariance on CUDA (prompts alone against packed in one step);
#   3. decode tok/s at 1, 16 and 64 streams and a 512-token prefill on the 8B file.
# Every result is a JSON line in OUT/device_check.jsonl (default ./device-check-out), and
# the whole log in OUT/device_check.log. nvidia-smi's view goes there too.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir="$repo/.devcheck"

prepare() {
    mkdir -p "$dir" "$repo/.git/info"
    grep -qx '/.devcheck/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.devcheck/' >>"$repo/.git/info/exclude"
    bash "$repo/scripts/build_cuda.sh"
    local bin="$repo/target/cuda/release/edgeinfer"
    strip -o "$dir/edgeinfer" "$bin"
    rm -f "$dir/edgeinfer.xz"
    xz -T0 -6 "$dir/edgeinfer"
    "$repo/target/release/edgeinfer" synth --vocab-only --out "$dir/vocab.gguf" 2>/dev/null ||
        "$bin" synth --vocab-only --out "$dir/vocab.gguf"
    cp "$0" "$dir/device_check.sh"
    du -sh "$dir"/*
    echo "carry .devcheck; on the GPU machine: bash .devcheck/device_check.sh run \$OUT"
}

run() {
    local out=${1:-./device-check-out}
    mkdir -p "$out"
    local log="$out/device_check.log" jsonl="$out/device_check.jsonl"
    exec > >(tee -a "$log") 2>&1
    local work=${WORK:-/tmp/edgeinfer-devcheck}
    mkdir -p "$work"
    xz -dc "$dir/edgeinfer.xz" >"$work/edgeinfer"
    chmod +x "$work/edgeinfer"
    # The CUDA 13 libraries candle links (cuBLAS, cuRAND, NVRTC, the runtime): from the
    # toolkit, or from a CUDA 13 PyTorch's wheels.
    local libs
    libs=$(find /usr /opt /lib /root /home \( -name 'libcublas.so.13*' -o -name 'libnvrtc.so.13*' -o -name 'libcurand.so.10*' -o -name 'libcudart.so.13*' \) 2>/dev/null |
        xargs -r -n1 dirname | sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH="${libs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    local e="$work/edgeinfer"
    "$e" --version
    ldd "$e" | grep -E 'not found|cuda|cublas|nvrtc|curand' || true
    local t0=$SECONDS
    "$e" synth --shape llama-3.1-8b --layers 2 --quant q4_k_m --donor "$dir/vocab.gguf" --out "$work/small.gguf"
    # LAYERS=N writes an N-layer "8B" instead (a dry run of this script on a CPU machine:
    # DEVICE=cpu LAYERS=1).
    "$e" synth --shape llama-3.1-8b ${LAYERS:+--layers $LAYERS} --quant q4_k_m --donor "$dir/vocab.gguf" --out "$work/8b.gguf"
    echo "== synth: $((SECONDS - t0)) s"
    local dev=${DEVICE:-cuda}
    "$e" backend-check --model "$work/small.gguf" --device "$dev" --compare --invariance | tee -a "$jsonl"
    "$e" backend-check --model "$work/8b.gguf" --device "$dev" --streams 1,16,64 --context 128 --steps 64 --prefill 512 | tee -a "$jsonl"
    echo "== done in $SECONDS s"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run "${2:-}" ;;
    *) echo "usage: $0 prepare | run [OUT]" >&2; exit 2 ;;
esac
