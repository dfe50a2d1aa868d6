//! Causal attention over an f16 KV cache with an online softmax, computed the way llama.cpp's
//! CPU flash attention computes it (Q rounded to f16, f32 dot products, the V accumulator
//! kept in f16), so greedy outputs agree with llama.cpp token for token.
//!
//! Layouts: `q` is `[t, n_head * head_dim]` f32 (RoPE applied); keys and values are f16 rows
//! of `n_kv_head * head_dim`, found through a block table ([`KvView`]).
//! Invariant: query `i` sits at position `start + i` and sees keys `0..=start + i` only.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Keys and values of one layer as seen by one sequence: position `p` is row
/// `blocks[p / block_size] * block_size + p % block_size` of `k` and `v`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub blocks: &'a [u32],
    pub block_size: usize,
    /// Values per row: `n_kv_head * head_dim`.
    pub stride: usize,
}

impl KvView<'_> {
    #[inline]
    fn row(&self, pos: usize) -> usize {
        (self.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size)
            * self.stride
    }
}

/// One sequence's part of a packed attention call.
#[derive(Clone, Copy)]
pub struct AttentionSeq<'a> {
    /// First row of this sequence in the packed `q` (and output).
    pub row: usize,
    /// Number of query rows (tokens this step).
    pub len: usize,
    /// Position of the first query row.
    pub start: usize,
    pub kv: KvView<'a>,
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Attention for a packed batch: `q` is `[rows, n_head * head_dim]` holding every sequence's
/// query rows; returns the same shape. (sequence, head) pairs run in parallel; each is computed
/// by one thread in a fixed order, so results do not depend on batching or thread count.
pub fn packed_attention(q: &[f32], seqs: &[AttentionSeq], shape: AttentionShape) -> Vec<f32> {
    let AttentionShape {
        n_head, head_dim, ..
    } = shape;
    let width = n_head * head_dim;
    let tasks: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..n_head).map(move |h| (s, h)))
        .collect();
    let per_task: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(s, h)| {
            let seq = &seqs[s];
            let rows = &q[seq.row * width..(seq.row + seq.len) * width];
            head_attention_dispatch(rows, seq.kv, seq.len, seq.start, shape, h)
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    for (&(s, h), rows) in tasks.iter().zip(&per_task) {
        let seq = &seqs[s];
        for (i, row) in rows.chunks_exact(head_dim).enumerate() {
            out[(seq.row + i) * width + h * head_dim..][..head_dim].copy_from_slice(row);
        }
    }
    out
}

/// [`head_attention`] compiled for AVX2 + FMA when the CPU has them (`mul_add` is then one
/// instruction instead of a library call); the same arithmetic either way.
fn head_attention_dispatch(
    q: &[f32],
    kv: KvView,
    t: usize,
    start: usize,
    shape: AttentionShape,
    h: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn fast(
            q: &[f32],
            kv: KvView,
            t: usize,
            start: usize,
            shape: AttentionShape,
            h: usize,
        ) -> Vec<f32> {
            head_attention(q, kv, t, start, shape, h)
        }
        if super::x86::available() {
            // Safety: the features were checked.
            return unsafe { fast(q, kv, t, start, shape, h) };
        }
    }
    head_attention(q, kv, t, start, shape, h)
}

/// One head's output for every query: `[t, head_dim]`.
#[inline(always)]
fn head_attention(
    q: &[f32],
    kv: KvView,
    t: usize,
    start: usize,
    shape: AttentionShape,
    h: usize,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let kv_off = (h / (shape.n_head / shape.n_kv_head)) * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; t * hd];
    let (mut qh, mut kr, mut vr) = (vec![0f32; hd], vec![0f32; hd], vec![0f32; hd]);
    let (mut acc, mut acc16) = (vec![0f32; hd], vec![f16::ZERO; hd]);
    let mut q16 = vec![f16::ZERO; hd];
    for i in 0..t {
        // Q rounded to f16, as llama.cpp converts it to the K cache's type.
        q16.convert_from_f32_slice(&q[(i * shape.n_head + h) * hd..][..hd]);
        q16.convert_to_f32_slice(&mut qh);
        acc.fill(0.0);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        for j in 0..=start + i {
            let row = kv.row(j) + kv_off;
            kv.k[row..][..hd].convert_to_f32_slice(&mut kr);
            let s = qh.iter().zip(&kr).map(|(a, b)| a * b).sum::<f32>() * scale;
            let (ms, vs) = if s > max {
                let ms = (max - s).exp();
                max = s;
                acc.iter_mut().for_each(|a| *a *= ms);
                round_to_f16(&mut acc, &mut acc16);
                (ms, 1.0)
            } else {
                (1.0, (s - max).exp())
            };
            kv.v[row..][..hd].convert_to_f32_slice(&mut vr);
            for (a, b) in acc.iter_mut().zip(&vr) {
                *a = b.mul_add(vs, *a);
            }
            // The accumulator lives in f16, as in llama.cpp's flash attention.
            round_to_f16(&mut acc, &mut acc16);
            sum = sum * ms + vs;
        }
        for (d, a) in out[i * hd..][..hd].iter_mut().zip(&acc) {
            *d = a / sum;
        }
    }
    out
}

/// Rounds every value to the nearest f16 (through a scratch buffer, with SIMD conversions).
#[inline]
fn round_to_f16(x: &mut [f32], scratch: &mut [f16]) {
    scratch.convert_from_f32_slice(x);
    scratch.convert_to_f32_slice(x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// One sequence over contiguous K/V (a block table of one-row blocks in order).
    fn causal_attention(
        q: &[f32],
        k: &[f16],
        v: &[f16],
        t: usize,
        start: usize,
        s: AttentionShape,
    ) -> Vec<f32> {
        let stride = s.n_kv_head * s.head_dim;
        let blocks: Vec<u32> = (0..(k.len() / stride) as u32).collect();
        let kv = KvView {
            k,
            v,
            blocks: &blocks,
            block_size: 1,
            stride,
        };
        packed_attention(
            q,
            &[AttentionSeq {
                row: 0,
                len: t,
                start,
                kv,
            }],
            s,
        )
    }

    #[test]
    fn block_tables_and_packing_change_nothing() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let shape = AttentionShape {
            n_head: 4,
            n_kv_head: 2,
            head_dim: 8,
        };
        let stride = 16;
        // Two sequences: 5 cached + 2 new, and 0 cached + 3 new; blocks of 2 rows, scattered.
        let (bs, n_blocks) = (2, 16);
        let k: Vec<f16> = (0..bs * n_blocks * stride)
            .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect();
        let v: Vec<f16> = (0..bs * n_blocks * stride)
            .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect();
        let (table_a, table_b) = (vec![9u32, 3, 14, 0], vec![7u32, 12]);
        let q: Vec<f32> = (0..5 * 4 * 8).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let view = |blocks: &'static [u32]| KvView {
            k: &k,
            v: &v,
            blocks,
            block_size: bs,
            stride,
        };
        let table_a: &'static [u32] = Box::leak(table_a.into_boxed_slice());
        let table_b: &'static [u32] = Box::leak(table_b.into_boxed_slice());
        let packed = packed_attention(
            &q,
            &[
                AttentionSeq {
                    row: 0,
                    len: 2,
                    start: 5,
                    kv: view(table_a),
                },
                AttentionSeq {
                    row: 2,
                    len: 3,
                    start: 0,
                    kv: view(table_b),
                },
            ],
            shape,
        );
        // The same sequences alone, over K/V copied out to contiguous rows.
        let gather = |blocks: &[u32], n: usize| -> (Vec<f16>, Vec<f16>) {
            let kv = KvView {
                k: &k,
                v: &v,
                blocks,
                block_size: bs,
                stride,
            };
            let rows = |src: &[f16]| {
                (0..n)
                    .flat_map(|p| src[kv.row(p)..][..stride].to_vec())
                    .collect::<Vec<_>>()
            };
            (rows(&k), rows(&v))
        };
        let (ka, va) = gather(table_a, 7);
        let alone_a = causal_attention(&q[..2 * 32], &ka, &va, 2, 5, shape);
        let (kb, vb) = gather(table_b, 3);
        let alone_b = causal_attention(&q[2 * 32..], &kb, &vb, 3, 0, shape);
        assert_eq!(packed[..2 * 32], alone_a[..]);
        assert_eq!(packed[2 * 32..], alone_b[..]);
    }

    /// Plain two-pass softmax attention in f64 over the same (f16) inputs.
    fn reference(
        q: &[f32],
        k: &[f16],
        v: &[f16],
        t: usize,
        start: usize,
        s: AttentionShape,
    ) -> Vec<f32> {
        let hd = s.head_dim;
        let group = s.n_head / s.n_kv_head;
        let stride = s.n_kv_head * hd;
        let mut out = vec![0f32; t * s.n_head * hd];
        for i in 0..t {
            for h in 0..s.n_head {
                let off = (h / group) * hd;
                let qr = &q[(i * s.n_head + h) * hd..][..hd];
                let scores: Vec<f64> = (0..=start + i)
                    .map(|j| {
                        let kr = &k[j * stride + off..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * b.to_f64())
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let y: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, w)| w * v[j * stride + off + d].to_f64())
                        .sum::<f64>()
                        / z;
                    out[(i * s.n_head + h) * hd + d] = y as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_plain_softmax_attention_within_f16_tolerance() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(n_head, n_kv_head, hd, t, start) in &[
            (4, 2, 16, 5, 0),
            (9, 3, 64, 1, 37),
            (8, 8, 32, 7, 11),
            (6, 1, 8, 3, 2),
        ] {
            let shape = AttentionShape {
                n_head,
                n_kv_head,
                head_dim: hd,
            };
            let kv = (start + t) * n_kv_head * hd;
            let q: Vec<f32> = (0..t * n_head * hd)
                .map(|_| rng.gen_range(-2.0..2.0))
                .collect();
            let k: Vec<f16> = (0..kv)
                .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
                .collect();
            let v: Vec<f16> = (0..kv)
                .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
                .collect();
            let got = causal_attention(&q, &k, &v, t, start, shape);
            let want = reference(&q, &k, &v, t, start, shape);
            let max_err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // f16 rounding of Q and of the running V sum: about 3 decimal digits.
            assert!(
                max_err < 2e-2,
                "shape {:?}: max error {max_err}",
                (n_head, n_kv_head, hd, t, start)
            );
        }
    }

    #[test]
    fn causality_future_keys_do_not_matter() {
        let shape = AttentionShape {
            n_head: 2,
            n_kv_head: 1,
            head_dim: 4,
        };
        let q = vec![0.5f32; 3 * 2 * 4];
        let mut k: Vec<f16> = (0..3 * 4).map(|i| f16::from_f32(i as f32 / 10.0)).collect();
        let mut v: Vec<f16> = (0..3 * 4).map(|i| f16::from_f32(i as f32)).collect();
        let before = causal_attention(&q, &k, &v, 3, 0, shape);
        // Change the last position's key and value: rows 0 and 1 must not move.
        for x in &mut k[8..] {
            *x = f16::from_f32(9.0);
        }
        for x in &mut v[8..] {
            *x = f16::from_f32(-9.0);
        }
        let after = causal_attention(&q, &k, &v, 3, 0, shape);
        assert_eq!(before[..16], after[..16]);
        assert_ne!(before[16..], after[16..]);
        // The first query sees only itself: its output is its own value row.
        assert_eq!(before[..4], [0.0, 1.0, 2.0, 3.0]);
    }
}
