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
    pub(crate) fn row(&self, pos: usize) -> usize {
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
/// query rows; returns the same shape. The work is split into tasks (see [`plan`]) that run
/// in parallel; each output row is computed by one thread in a fixed order, so results do not
/// depend on batching, the split or the thread count.
pub fn packed_attention(q: &[f32], seqs: &[AttentionSeq], shape: AttentionShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if shape.head_dim.is_multiple_of(8) && shape.head_dim <= 256 {
        return packed_attention_with(q, seqs, shape, super::attention_x86::best());
    }
    packed_attention_with(q, seqs, shape, None)
}

#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug, Clone, Copy)]
enum Variant {}
#[cfg(target_arch = "x86_64")]
use super::attention_x86::Variant;

/// One unit of work: sequence `seq`, KV head `kvh`, the query heads `heads` of its group
/// (absolute head indices) and the query rows `rows` (relative to the sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Task {
    pub seq: usize,
    pub kvh: usize,
    pub heads: std::ops::Range<usize>,
    pub rows: std::ops::Range<usize>,
}

impl Task {
    fn cost(&self, start: usize) -> usize {
        self.heads.len() * self.rows.len() * (start + self.rows.end)
    }
}

/// One task per (sequence, KV head), so the query heads sharing a KV head read its keys once;
/// the costliest tasks are then halved (by query rows, else by heads) until there are a few
/// per thread, so one long prompt or one decoding sequence still uses every core.
fn plan(seqs: &[AttentionSeq], shape: AttentionShape) -> Vec<Task> {
    let group = shape.n_head / shape.n_kv_head;
    let mut tasks: Vec<Task> = seqs
        .iter()
        .enumerate()
        .flat_map(|(seq, s)| {
            (0..shape.n_kv_head).map(move |kvh| Task {
                seq,
                kvh,
                heads: kvh * group..(kvh + 1) * group,
                rows: 0..s.len,
            })
        })
        .collect();
    let want = 4 * rayon::current_num_threads();
    while tasks.len() < want {
        let Some((i, _)) = tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.rows.len() > 1 || t.heads.len() > 1)
            .max_by_key(|(_, t)| t.cost(seqs[t.seq].start))
        else {
            break;
        };
        let t = tasks[i].clone();
        let (a, b) = if t.rows.len() > 1 {
            let mid = t.rows.start + t.rows.len() / 2;
            (
                Task {
                    rows: t.rows.start..mid,
                    ..t.clone()
                },
                Task {
                    rows: mid..t.rows.end,
                    ..t
                },
            )
        } else {
            let mid = t.heads.start + t.heads.len() / 2;
            (
                Task {
                    heads: t.heads.start..mid,
                    ..t.clone()
                },
                Task {
                    heads: mid..t.heads.end,
                    ..t
                },
            )
        };
        tasks[i] = a;
        tasks.push(b);
    }
    tasks
}

fn packed_attention_with(
    q: &[f32],
    seqs: &[AttentionSeq],
    shape: AttentionShape,
    simd: Option<Variant>,
) -> Vec<f32> {
    let AttentionShape {
        n_head, head_dim, ..
    } = shape;
    let width = n_head * head_dim;
    let tasks = plan(seqs, shape);
    // Each task's output: for each of its rows, for each of its heads, `head_dim` values.
    let per_task: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| {
            let seq = &seqs[t.seq];
            let rows = &q[seq.row * width..(seq.row + seq.len) * width];
            #[cfg(target_arch = "x86_64")]
            if let Some(v) = simd {
                // Safety: `best()` checked the CPU features, `packed_attention` the head size.
                return unsafe {
                    super::attention_x86::group_attention(v, rows, seq.kv, seq.start, shape, t)
                };
            }
            let _ = simd;
            let mut out = Vec::with_capacity(t.rows.len() * t.heads.len() * head_dim);
            let per_head: Vec<Vec<f32>> = t
                .heads
                .clone()
                .map(|h| head_attention_dispatch(rows, seq.kv, t.rows.clone(), seq.start, shape, h))
                .collect();
            for i in 0..t.rows.len() {
                for ph in &per_head {
                    out.extend_from_slice(&ph[i * head_dim..][..head_dim]);
                }
            }
            out
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    for (t, vals) in tasks.iter().zip(&per_task) {
        let seq = &seqs[t.seq];
        let mut it = vals.chunks_exact(head_dim);
        for i in t.rows.clone() {
            for h in t.heads.clone() {
                let src = it
                    .next()
                    .expect("one chunk per (row, head). This is a bug.");
                out[(seq.row + i) * width + h * head_dim..][..head_dim].copy_from_slice(src);
            }
        }
    }
    out
}

/// [`head_attention`] compiled for AVX2 + FMA when the CPU has them (`mul_add` is then one
/// instruction instead of a library call); the same arithmetic either way.
fn head_attention_dispatch(
    q: &[f32],
    kv: KvView,
    rows: std::ops::Range<usize>,
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
            rows: std::ops::Range<usize>,
            start: usize,
            shape: AttentionShape,
            h: usize,
        ) -> Vec<f32> {
            head_attention(q, kv, rows, start, shape, h)
        }
        if super::x86::available() {
            // Safety: the features were checked.
            return unsafe { fast(q, kv, rows, start, shape, h) };
        }
    }
    head_attention(q, kv, rows, start, shape, h)
}

/// The portable path: one head's output for the query rows `rows`, `[rows.len(), head_dim]`.
/// Each key's score adds its products in element order (multiply, then add), exactly as the
/// AVX2 path computes it eight keys at a time.
#[inline(always)]
fn head_attention(
    q: &[f32],
    kv: KvView,
    rows: std::ops::Range<usize>,
    start: usize,
    shape: AttentionShape,
    h: usize,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let kv_off = (h / (shape.n_head / shape.n_kv_head)) * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = Vec::with_capacity(rows.len() * hd);
    let mut qh = vec![0f32; hd];
    let mut acc = vec![0f32; hd];
    let mut kr = vec![0f32; hd];
    let mut scores = vec![0f32; start + rows.end];
    for i in rows {
        // Q rounded to f16, as llama.cpp converts it to the K cache's type.
        qh.copy_from_slice(&q[(i * shape.n_head + h) * hd..][..hd]);
        round_to_f16(&mut qh);
        let seen = start + i + 1;
        for (j, s) in scores[..seen].iter_mut().enumerate() {
            kv.k[kv.row(j) + kv_off..][..hd].convert_to_f32_slice(&mut kr);
            let mut sum = 0f32;
            for (&qd, &k) in qh.iter().zip(&kr) {
                sum += qd * k;
            }
            *s = sum;
        }
        accumulate_from_cache(&scores[..seen], scale, &mut acc, kv, kv_off);
        out.extend_from_slice(&acc);
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
    if hd.is_multiple_of(8) && hd <= 256 && super::x86::available() {
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
pub(crate) unsafe fn accumulate_x86(
    scores: &[f32],
    scale: f32,
    acc: &mut [f32],
    kv: KvView,
    kv_off: usize,
) {
    // A fixed width keeps the f16 accumulators in registers (a loop over a run-time count
    // kept them in memory: a store and reload on every key's dependency chain).
    match acc.len() {
        64 => accumulate_x86_n::<8>(scores, scale, acc, kv, kv_off),
        128 => accumulate_x86_n::<16>(scores, scale, acc, kv, kv_off),
        _ => accumulate_x86_any(scores, scale, acc, kv, kv_off),
    }
}

/// [`accumulate_x86`] for `head_dim == 8 * N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn accumulate_x86_n<const N: usize>(
    scores: &[f32],
    scale: f32,
    acc: &mut [f32],
    kv: KvView,
    kv_off: usize,
) {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;
    assert_eq!(acc.len(), N * 8);
    let mut acc16 = [_mm_setzero_si128(); N];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for (j, &raw) in scores.iter().enumerate() {
        let s = raw * scale;
        let (ms, vs) = if s > max {
            let ms = (max - s).exp();
            max = s;
            let m = _mm256_set1_ps(ms);
            for a in acc16.iter_mut() {
                *a = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_cvtph_ps(*a), m), NEAREST);
            }
            (ms, 1.0)
        } else {
            (1.0, (s - max).exp())
        };
        // A checked slice: the view's fields are public, so no trust in the block table.
        let row = &kv.v[kv.row(j) + kv_off..][..N * 8];
        let v = row.as_ptr() as *const __m128i;
        let w = _mm256_set1_ps(vs);
        for (i, a) in acc16.iter_mut().enumerate() {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.add(i)));
            *a = _mm256_cvtps_ph(_mm256_fmadd_ps(vv, w, _mm256_cvtph_ps(*a)), NEAREST);
        }
        sum = sum * ms + vs;
    }
    for (i, a) in acc16.iter().enumerate() {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(*a));
        for (dst, x) in acc[i * 8..i * 8 + 8].iter_mut().zip(out) {
            *dst = x / sum;
        }
    }
}

/// [`accumulate_x86`] for any `head_dim` that is a multiple of 8, up to 256.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn accumulate_x86_any(
    scores: &[f32],
    scale: f32,
    acc: &mut [f32],
    kv: KvView,
    kv_off: usize,
) {
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

    #[test]
    fn avx2_path_is_bit_identical_to_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if super::super::x86::available() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            for &(n_head, n_kv_head, hd) in &[(9, 3, 64), (32, 8, 128), (4, 4, 16), (6, 2, 8)] {
                let shape = AttentionShape {
                    n_head,
                    n_kv_head,
                    head_dim: hd,
                };
                let stride = n_kv_head * hd;
                let (bs, n_blocks) = (4, 64);
                let mut gen = |n: usize| -> Vec<f16> {
                    (0..n)
                        .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
                        .collect()
                };
                let k = gen(bs * n_blocks * stride);
                let v = gen(bs * n_blocks * stride);
                // (cached, new) per sequence: decodes, a long prefill, odd key counts.
                let plan: [(usize, usize); 5] = [(0, 1), (37, 1), (0, 13), (90, 20), (5, 3)];
                let mut tables: Vec<Vec<u32>> = Vec::new();
                let mut next = 0u32;
                for &(c, t) in &plan {
                    let n = (c + t).div_ceil(bs) as u32;
                    // Reversed, so no table is in order.
                    tables.push((next..next + n).rev().collect());
                    next += n;
                }
                let rows: usize = plan.iter().map(|p| p.1).sum();
                let q: Vec<f32> = (0..rows * n_head * hd)
                    .map(|_| rng.gen_range(-2.0..2.0))
                    .collect();
                let mut row = 0;
                let seqs: Vec<AttentionSeq> = plan
                    .iter()
                    .zip(&tables)
                    .map(|(&(c, t), table)| {
                        let s = AttentionSeq {
                            row,
                            len: t,
                            start: c,
                            kv: KvView {
                                k: &k,
                                v: &v,
                                blocks: table,
                                block_size: bs,
                                stride,
                            },
                        };
                        row += t;
                        s
                    })
                    .collect();
                let portable = packed_attention_with(&q, &seqs, shape, None);
                let mut variants = vec![Variant::Avx2];
                if super::super::attention_x86::best() == Some(Variant::Avx512) {
                    variants.push(Variant::Avx512);
                }
                for v in variants {
                    let fast = packed_attention_with(&q, &seqs, shape, Some(v));
                    assert!(
                        fast.iter()
                            .zip(&portable)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{v:?}, shape {:?}",
                        (n_head, n_kv_head, hd)
                    );
                    // Each sequence alone (another task split) gives the same bits.
                    let alone =
                        packed_attention_with(&q[..n_head * hd], &seqs[..1], shape, Some(v));
                    assert_eq!(alone[..], fast[..n_head * hd]);
                }
            }
        }
    }

    #[test]
    fn the_plan_covers_every_row_and_head_once() {
        let shape = AttentionShape {
            n_head: 9,
            n_kv_head: 3,
            head_dim: 8,
        };
        let k = [f16::ZERO; 8];
        let kv = KvView {
            k: &k,
            v: &k,
            blocks: &[],
            block_size: 1,
            stride: 24,
        };
        for lens in [vec![1], vec![1, 1], vec![30], vec![1, 7, 100], vec![1; 40]] {
            let seqs: Vec<AttentionSeq> = lens
                .iter()
                .map(|&len| AttentionSeq {
                    row: 0,
                    len,
                    start: 3,
                    kv,
                })
                .collect();
            let mut seen = std::collections::HashSet::new();
            for t in plan(&seqs, shape) {
                for r in t.rows.clone() {
                    for h in t.heads.clone() {
                        assert_eq!(h / 3, t.kvh, "a head outside its KV group");
                        assert!(seen.insert((t.seq, r, h)), "done twice");
                    }
                }
            }
            assert_eq!(seen.len(), lens.iter().sum::<usize>() * 9, "{lens:?}");
        }
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
