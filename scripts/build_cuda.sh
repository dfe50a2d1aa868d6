#!/usr/bin/env bash
# Builds edgeinfer with the CUDA backend (`--features cuda`) on a machine without a GPU or a
# system CUDA toolkit.
#
#   scripts/build_cuda.sh [extra cargo args...]
#   SETUP_ONLY=1 scripts/build_cuda.sh      # only the toolkit
#
# It sets up a CUDA 13.0 toolkit from NVIDIA's Python wheels under $CUDA_PREFIX (default
# /opt/edgeinfer-cuda, outside the repository): nvcc, the headers, CCCL, and the runtime,
# NVRTC, cuBLAS and cuRAND libraries that candle links against. CUDA 13.0 because the
# driver on the machines we target (580.x) loads PTX up to ISA 9.0; a newer nvcc writes
# PTX those drivers refuse. The driver library itself (libcuda.so.1) comes with the
# driver, never with a toolkit, so the link uses a stub of it built here from the names
# cudarc calls (each returns CUDA_ERROR_NO_DEVICE); the real one is loaded at run time on
# the GPU machine.
#
# Then it runs `cargo build --release --features cuda` into target/cuda (its own target
# folder, so the default CPU build is not rebuilt) for CUDA_COMPUTE_CAP (default 90:
# Hopper, H100/H200), and prints how long each part took.
#
# Running the binary needs libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10 and libnvrtc.so.13 on LD_LIBRARY_PATH: a CUDA 13 toolkit has them, and
# so does a CUDA 13 build of PyTorch (its nvidia/cu13/lib).
set -euo pipefail

PREFIX=${CUDA_PREFIX:-/opt/edgeinfer-cuda}
CAP=${CUDA_COMPUTE_CAP:-90}
WHEELS=(
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*'
    'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-nvrtc==13.0.*'
    'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.0.*'
)
repo=$(cd "$(dirname "$0")/.." && pwd)
t0=$(date +%s)

if [ ! -x "$PREFIX/root/nvidia/cu13/bin/nvcc" ] || [ ! -e "$PREFIX/root/nvidia/cu13/lib/libcublas.so" ]; then
    echo "== setting up the CUDA 13.0 toolkit from wheels in $PREFIX"
    mkdir -p "$PREFIX/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        -d "$PREFIX/wheels" "${WHEELS[@]}"
    rm -rf "$PREFIX/root"
    mkdir -p "$PREFIX/root"
    for w in "$PREFIX"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$PREFIX/root"
    done
    chmod +x "$PREFIX"/root/nvidia/cu13/bin/* "$PREFIX"/root/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
    # The linker looks for libX.so; the wheels ship only libX.so.N.
    lib="$PREFIX/root/nvidia/cu13/lib"
    for so in "$lib"/lib*.so.*; do
        base=${so%%.so.*}.so
        [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
    done
fi
CUDA_HOME="$PREFIX/root/nvidia/cu13"
lib="$CUDA_HOME/lib"

stub="$PREFIX/stubs/libcuda.so"
if [ ! -e "$stub" ]; then
    echo "== building a link stub of the driver library (libcuda.so.1)"
    mkdir -p "$PREFIX/stubs"
    (cd "$repo" && cargo fetch -q)
    sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19*/src/driver/sys/mod.rs' | sort | tail -1)
    grep -oE 'fn cu[A-Za-z0-9_]+\(' "$sys" | sed 's/^fn //; s/($//' | sort -u |
        awk '{ print "int " $1 "(void) { return 100; }" }' >"$PREFIX/stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$PREFIX/stubs/libcuda_stub.c"
fi
t1=$(date +%s)
if [ -n "${SETUP_ONLY:-}" ]; then
    echo "== toolkit set up in $PREFIX in $((t1 - t0)) s"
    exit 0
fi

export CUDA_HOME CUDA_PATH="$CUDA_HOME" NVCC="$CUDA_HOME/bin/nvcc" CUDA_COMPUTE_CAP="$CAP"
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$PREFIX/stubs:$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$PREFIX/stubs -L native=$lib"
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
echo "== nvcc: $("$NVCC" --version | tail -1); compute capability $CAP"

cd "$repo"
cargo build --release --features cuda --target-dir target/cuda "$@"
t2=$(date +%s)
echo "== built target/cuda/release/edgeinfer"
echo "== toolkit set-up $((t1 - t0)) s, cargo build $((t2 - t1)) s, total $((t2 - t0)) s"
