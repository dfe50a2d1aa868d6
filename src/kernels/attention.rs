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
    let len = start + t;
    let mut out = vec![0f32; t * hd];
    let mut qh = vec![0f32; hd];
    let mut acc = vec![0f32; hd];
    let mut scores = vec![0f32; len];
    if t == 1 {
        // Decode: one query; read each key and value straight from the cache.
        qh.copy_from_slice(&q[h * hd..][..hd]);
        round_to_f16(&mut qh);
        // Eight keys at a time: eight independent sums, each still in element order.
        let mut kr = vec![0f32; 8 * hd];
        for (c, chunk) in scores.chunks_mut(8).enumerate() {
            for (l, _) in chunk.iter().enumerate() {
                let j = c * 8 + l;
                kv.k[kv.row(j) + kv_off..][..hd].convert_to_f32_slice(&mut kr[l * hd..][..hd]);
            }
            let mut s8 = [0f32; 8];
            for (d, &qd) in qh.iter().enumerate() {
                for (l, s) in s8.iter_mut().enumerate() {
                    *s += qd * kr[l * hd + d];
                }
            }
            chunk.copy_from_slice(&s8[..chunk.len()]);
        }
        accumulate_from_cache(&scores, scale, &mut acc, kv, kv_off);
        out.copy_from_slice(&acc);
        return out;
    }
    // Prefill: this head's keys, transposed (`[head_dim, len]`) and widened to f32 once per
    // call rather than once per query.
    let mut kt = vec![0f32; hd * len];
    let mut row = vec![0f32; hd];
    for j in 0..len {
        let r = kv.row(j) + kv_off;
        kv.k[r..][..hd].convert_to_f32_slice(&mut row);
        for (d, &x) in row.iter().enumerate() {
            kt[d * len + j] = x;
        }
    }
    for i in 0..t {
        // Q rounded to f16, as llama.cpp converts it to the K cache's type.
        qh.copy_from_slice(&q[(i * shape.n_head + h) * hd..][..hd]);
        round_to_f16(&mut qh);
        let seen = start + i + 1;
        // Every key's score at once: lanes run over keys, and each key's sum still adds
        // its products in element order, exactly as the decode path does.
        let scores = &mut scores[..seen];
        scores.fill(0.0);
        for (d, &qd) in qh.iter().enumerate() {
            for (s, &k) in scores.iter_mut().zip(&kt[d * len..d * len + seen]) {
                *s += qd * k;
            }
        }
        accumulate_from_cache(scores, scale, &mut acc, kv, kv_off);
        out[i * hd..][..hd].copy_from_slice(&acc);
    }
    out
}

/// [`softmax_accumulate`] over the values of `kv` (this head's slice at `kv_off`): with F16C
/// the accumulator stays in f16 registers and values are widened as they are read, exactly
/// as the generic code computes it.
#[inline(always)]
fn accumulate_from_cache(scores: &[f32], scale: f32, acc: &mut [f32], kv: KvView, kv_off: usize) {
    let hd = acc.len();
    #[cfg(target_arch = "x86_64")]
    if hd % 8 == 0 && hd <= 256 && super::x86::available() {
        // Safety: AVX2, FMA and F16C were checked.
        unsafe { accumulate_x86(scores, scale, acc, kv, kv_off) };
        return;
    }
    let mut vr = vec![0f32; hd];
    softmax_accumulate(scores, scale, acc, |j, dst| {
        kv.v[kv.row(j) + kv_off..][..hd].convert_to_f32_slice(&mut vr);
        dst.copy_from_slice(&vr);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn accumulate_x86(scores: &[f32], scale: f32, acc: &mut [f32], kv: KvView, kv_off: usize) {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;
    let vecs = acc.len() / 8;
    let mut acc16 = [_mm_setzero_si128(); 32];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for (j, &raw) in scores.iter().enumerate() {
        let s = raw * scale;
        let (ms, vs) = if s > max {
            let ms = (max - s).exp();
            max = s;
            let m = _mm256_set1_ps(ms);
            for a in acc16.iter_mut().take(vecs) {
                *a = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_cvtph_ps(*a), m), NEAREST);
            }
            (ms, 1.0)
        } else {
            (1.0, (s - max).exp())
        };
        // A checked slice: the view's fields are public, so no trust in the block table.
        let row = &kv.v[kv.row(j) + kv_off..][..vecs * 8];
        let v = row.as_ptr() as *const __m128i;
        let w = _mm256_set1_ps(vs);
        for (i, a) in acc16.iter_mut().take(vecs).enumerate() {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.add(i)));
            *a = _mm256_cvtps_ph(_mm256_fmadd_ps(vv, w, _mm256_cvtph_ps(*a)), NEAREST);
        }
        sum = sum * ms + vs;
    }
    for (i, a) in acc16.iter().take(vecs).enumerate() {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(*a));
        for (dst, x) in acc[i * 8..i * 8 + 8].iter_mut().zip(out) {
            *dst = x / sum;
        }
    }
}

/// Online softmax over `scores` (times `scale`) weighting the values `value(j)`, with the
/// accumulator rounded to f16 after every update as llama.cpp's flash attention keeps it.
/// Leaves the normalised output in `acc`.
#[inline(always)]
fn softmax_accumulate(
    scores: &[f32],
    scale: f32,
    acc: &mut [f32],
    mut value: impl FnMut(usize, &mut [f32]),
) {
    let mut v = vec![0f32; acc.len()];
    acc.fill(0.0);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for (j, &raw) in scores.iter().enumerate() {
        let s = raw * scale;
        let (ms, vs) = if s > max {
            let ms = (max - s).exp();
            max = s;
            acc.iter_mut().for_each(|a| *a *= ms);
            round_to_f16(acc);
            (ms, 1.0)
        } else {
            (1.0, (s - max).exp())
        };
        value(j, &mut v);
        for (a, b) in acc.iter_mut().zip(&v) {
            *a = b.mul_add(vs, *a);
        }
        round_to_f16(acc);
        sum = sum * ms + vs;
    }
    acc.iter_mut().for_each(|a| *a /= sum);
}

/// Rounds every value to the nearest f16.
#[inline(always)]
fn round_to_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::x86::available() {
            // Safety: AVX2 and F16C were just checked (cached loads).
            unsafe { round_to_f16_x86(x) };
            return;
        }
    }
    for v in x.iter_mut() {
        *v = f16::from_f32(*v).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn round_to_f16_x86(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = _mm256_loadu_ps(c.as_ptr());
        let h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
    }
    for v in chunks.into_remainder() {
        *v = f16::from_f32(*v).to_f32();
    }
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
    fn f16c_accumulation_is_bit_identical_to_the_generic_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (hd, len) = (64, 37);
        let v: Vec<f16> = (0..len * hd)
            .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
            .collect();
        let blocks: Vec<u32> = (0..len as u32).collect();
        let kv = KvView {
            k: &v,
            v: &v,
            blocks: &blocks,
            block_size: 1,
            stride: hd,
        };
        let scores: Vec<f32> = (0..len).map(|_| rng.gen_range(-6.0..6.0)).collect();
        let mut generic = vec![0f32; hd];
        let mut vr = vec![0f32; hd];
        softmax_accumulate(&scores, 0.125, &mut generic, |j, dst| {
            kv.v[kv.row(j)..][..hd].convert_to_f32_slice(&mut vr);
            dst.copy_from_slice(&vr);
        });
        #[cfg(target_arch = "x86_64")]
        if super::super::x86::available() {
            let mut fast = vec![0f32; hd];
            unsafe { accumulate_x86(&scores, 0.125, &mut fast, kv, 0) };
            assert_eq!(fast, generic);
        }
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
