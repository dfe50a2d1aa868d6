// edgeinfer's own CUDA kernels: RoPE, writing into and copying within the paged f16 KV pool,
// and paged attention over block tables (decode and chunked prefill in one launch).
// Compiled to PTX by build.rs when the `cuda` feature is on; loaded at run time by
// src/backend/cuda/mod.rs. candle provides the quantized matmuls, norms and elementwise ops.
//
// Layout (the same as the CPU's KvPool): per layer, K and V are [n_blocks * block_size,
// stride] f16, stride = n_kv_head * head_dim; position p of a sequence lives at slot
// table[p / block_size] * block_size + p % block_size.

#include <cuda_fp16.h>
#include <stdint.h>

#define WARPS 4
#define MAX_HEAD_DIM 256

// Interleaved rotary embedding: pairs (x[2j], x[2j+1]) of every head of every row rotated by
// the row's (cos, sin) for j. x and out: [rows, heads * head_dim]; table: [rows, head_dim/2]
// pairs of (cos, sin).
extern "C" __global__ void rope_f32(const float *x, float *out, const float2 *table, int rows,
                                    int heads, int head_dim) {
    const int half = head_dim / 2;
    const long total = (long)rows * heads * half;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        const long row = i / ((long)heads * half);
        const int j = (int)(i % half);
        const long at = 2 * i; // pairs are contiguous: row * heads * head_dim + h * head_dim + 2j
        const float2 cs = table[row * half + j];
        const float x0 = x[at], x1 = x[at + 1];
        out[at] = x0 * cs.x - x1 * cs.y;
        out[at + 1] = x0 * cs.y + x1 * cs.x;
    }
}

// Stores row r of k and v (f32, rounded to nearest f16) at slot slots[r] of the layer's pool.
extern "C" __global__ void kv_write_f32(const float *k, const float *v, __half *kc, __half *vc,
                                        const int *slots, int rows, int stride) {
    const long total = (long)rows * stride;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        const long r = i / stride;
        const long c = i % stride;
        const long dst = (long)slots[r] * stride + c;
        kc[dst] = __float2half_rn(k[i]);
        vc[dst] = __float2half_rn(v[i]);
    }
}

// Copies len values from src to dst within one layer's K and V (a block's first rows).
extern "C" __global__ void kv_copy(__half *kc, __half *vc, long src, long dst, long len) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < len;
         i += (long)gridDim.x * blockDim.x) {
        kc[dst + i] = kc[src + i];
        vc[dst + i] = vc[src + i];
    }
}

// Causal attention over paged KV. One block of WARPS warps per (row, head); warp w takes
// positions w, w + WARPS, ... of 0..=row_pos[row], with an online softmax, and the warps'
// partial results are merged at the end. Lane l holds dimensions l, l + 32, ...
// q, out: [rows, n_head * head_dim] f32. row_table[r] is the offset of row r's block table
// in tables.
extern "C" __global__ void paged_attention_f32(const float *q, const __half *kc,
                                               const __half *vc, float *out,
                                               const int *row_pos, const int *row_table,
                                               const int *tables, int n_head, int n_kv_head,
                                               int head_dim, int block_size, float scale) {
    constexpr int PER_LANE = MAX_HEAD_DIM / 32;
    __shared__ float s_m[WARPS];
    __shared__ float s_l[WARPS];
    __shared__ float s_acc[WARPS][MAX_HEAD_DIM];

    const int row = blockIdx.x;
    const int head = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kv_head = head / (n_head / n_kv_head);
    const int stride = n_kv_head * head_dim;
    const int n_pos = row_pos[row] + 1;
    const int *table = tables + row_table[row];

    float qr[PER_LANE];
    float acc[PER_LANE];
    const float *qh = q + ((long)row * n_head + head) * head_dim;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + 32 * i;
        // Rounded to f16 as the CPU kernel (and llama.cpp) does before the dot product.
        qr[i] = d < head_dim ? __half2float(__float2half_rn(qh[d])) : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int p = warp; p < n_pos; p += WARPS) {
        const long slot = (long)table[p / block_size] * block_size + p % block_size;
        const __half *kp = kc + slot * stride + (long)kv_head * head_dim;
        const __half *vp = vc + slot * stride + (long)kv_head * head_dim;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) s += qr[i] * __half2float(kp[d]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        s *= scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float e = expf(s - m_new);
        l = l * corr + e;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int d = lane + 32 * i;
            const float vd = d < head_dim ? __half2float(vp[d]) : 0.f;
            acc[i] = acc[i] * corr + e * vd;
        }
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) s_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float big = -INFINITY;
    for (int w = 0; w < WARPS; w++) big = fmaxf(big, s_m[w]);
    float total = 0.f;
    for (int w = 0; w < WARPS; w++)
        if (s_l[w] > 0.f) total += s_l[w] * expf(s_m[w] - big);
    float *oh = out + ((long)row * n_head + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < WARPS; w++)
            if (s_l[w] > 0.f) o += s_acc[w][d] * expf(s_m[w] - big);
        oh[d] = o / total;
    }
}
