//! The x86 attention task kernel, compiled twice: for AVX2 + FMA + F16C, and for the same
//! plus AVX-512 F/VL, whose 32 vector registers let several heads' f16 accumulators stay in
//! registers at once. Both do the arithmetic of the portable path in
//! [`super::attention`] (same operations, same order), so results are bit-identical.
//!
//! Per task: eight query rows at a time, 64 keys are transposed to f32 into an L1-sized block
//! and scored by every (row, head) of those rows: eight keys per vector with AVX2; sixteen,
//! up to four queries per load, with AVX-512 ([`super::attention_wide`]). Then the heads of a
//! row accumulate their values together, so the loads of each value row are shared and the
//! heads' dependency chains (f16 accumulator -> FMA -> f16) overlap.

#![cfg(target_arch = "x86_64")]

use std::cell::RefCell;

use half::f16;

use super::attention::{AttentionShape, KvView, Task};

/// How many positions ahead of the key transpose the cache rows (keys and values) are
/// prefetched. Without it the transpose waited on memory for every key (a step's weights
/// stream through the caches between layers): at 200 tokens, 16 ahead gave decode 1.046x
/// median over 6 pairs; 32 and all at once measured the same as 16.
const KV_AHEAD: usize = 16;

/// Scratch memory of one thread's attention tasks, kept between calls.
#[derive(Default)]
struct Scratch {
    /// One block of this KV head's keys, transposed and widened: `[head_dim][BLOCK]`.
    kt: Vec<f32>,
    /// One row of scores per (query row, head) of a block of rows, `kpad` apart.
    scores: Vec<f32>,
    /// Those queries, rounded to f16, `head_dim` apart.
    qh: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Which compiled variant runs: AVX-512 F/VL when the CPU has it (and
/// `EDGEINFER_NO_AVX512` is unset), else AVX2. `None`: neither, or `EDGEINFER_NO_SIMD` is
/// set (use the portable path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Avx2,
    Avx512,
}

pub fn best() -> Option<Variant> {
    static BEST: std::sync::OnceLock<Option<Variant>> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        if !super::x86::available() || super::env_flag("EDGEINFER_NO_SIMD") {
            return None;
        }
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && !super::env_flag("EDGEINFER_NO_AVX512");
        Some(if avx512 {
            Variant::Avx512
        } else {
            Variant::Avx2
        })
    })
}

/// Runs one task (see [`super::attention`]); returns, for each of its rows, for each of its
/// heads, `head_dim` values.
///
/// # Safety
/// The CPU must support `variant`'s features, and `head_dim % 8 == 0`.
pub unsafe fn group_attention(
    variant: Variant,
    q: &[f32],
    kv: KvView,
    start: usize,
    shape: AttentionShape,
    t: &Task,
) -> Vec<f32> {
    match variant {
        Variant::Avx2 => avx2::group_attention(q, kv, start, shape, t),
        Variant::Avx512 => avx512::group_attention(q, kv, start, shape, t),
    }
}

macro_rules! kernels {
    ($module:ident, $features:literal, $max_acc_regs:literal, $wide:literal) => {
        mod $module {
            use std::arch::x86_64::*;

            use super::*;
            #[allow(unused_imports)]
            use crate::kernels::attention_wide as wide;

            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

            #[target_feature(enable = $features)]
            pub unsafe fn group_attention(
                q: &[f32],
                kv: KvView,
                start: usize,
                shape: AttentionShape,
                t: &Task,
            ) -> Vec<f32> {
                let hd = shape.head_dim;
                let kv_off = t.kvh * hd;
                let scale = 1.0 / (hd as f32).sqrt();
                let lanes = if $wide { wide::LANES } else { 8 };
                let nh = t.heads.len();
                let mut out = Vec::with_capacity(t.rows.len() * nh * hd);
                SCRATCH.with(|cell| {
                    let sc = &mut *cell.borrow_mut();
                    // The query rows `ROWS` at a time: each block of keys is transposed
                    // once and scored by every head of those rows while in L1.
                    const ROWS: usize = 8;
                    sc.kt.resize(hd * wide::BLOCK, 0.0);
                    sc.acc.resize(nh * hd, 0.0);
                    for r0 in t.rows.clone().step_by(ROWS) {
                        let r1 = t.rows.end.min(r0 + ROWS);
                        let nq = (r1 - r0) * nh;
                        let keys = start + r1;
                        let kpad = keys.div_ceil(lanes) * lanes;
                        sc.qh.resize(nq * hd, 0.0);
                        sc.scores.resize(nq * kpad, 0.0);
                        for i in r0..r1 {
                            for (k, h) in t.heads.clone().enumerate() {
                                let src = &q[(i * shape.n_head + h) * hd..][..hd];
                                let at = ((i - r0) * nh + k) * hd;
                                round_to_f16(src, &mut sc.qh[at..][..hd]);
                            }
                        }
                        for j0 in (0..kpad).step_by(wide::BLOCK) {
                            let j1 = kpad.min(j0 + wide::BLOCK);
                            let kt = &mut sc.kt;
                            transpose_keys(kv, kv_off, keys, hd, j0..j1, wide::BLOCK, kt);
                            let (qh, sco) = (&sc.qh[..nq * hd], &mut sc.scores[..nq * kpad]);
                            if $wide {
                                wide::scores_heads(qh, nq, kt, j1 - j0, sco, kpad, j0);
                            } else {
                                for (qi, q) in qh.chunks_exact(hd).enumerate() {
                                    scores(q, kt, wide::BLOCK, j1 - j0, &mut sco[qi * kpad + j0..]);
                                }
                            }
                        }
                        for i in r0..r1 {
                            accumulate_heads(
                                &sc.scores[(i - r0) * nh * kpad..],
                                kpad,
                                nh,
                                start + i + 1,
                                scale,
                                &mut sc.acc,
                                kv,
                                kv_off,
                            );
                            out.extend_from_slice(&sc.acc);
                        }
                    }
                });
                out
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn round_to_f16(src: &[f32], dst: &mut [f32]) {
                for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
                    let h = _mm256_cvtps_ph(_mm256_loadu_ps(s.as_ptr()), NEAREST);
                    _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
                }
            }

            /// Keys `span` (of `0..keys`; bounds multiples of 8) of one KV head into `kt`
            /// (`[hd][width]`, f32, key `span.start` first), eight keys by eight dimensions at
            /// a time through an 8x8 transpose of 16-bit lanes; padding keys are zero.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn transpose_keys(
                kv: KvView,
                kv_off: usize,
                keys: usize,
                hd: usize,
                span: std::ops::Range<usize>,
                width: usize,
                kt: &mut [f32],
            ) {
                let zero = [f16::ZERO; 256];
                assert!(kt.len() >= hd * width && hd % 8 == 0 && hd <= zero.len());
                assert!(span.start % 8 == 0 && span.end % 8 == 0 && span.len() <= width);
                if span.start == 0 {
                    for j in 0..keys.min(KV_AHEAD) {
                        prefetch_kv(kv, j, kv_off, hd);
                    }
                }
                for j0 in span.clone().step_by(8) {
                    for j in (j0 + KV_AHEAD..j0 + KV_AHEAD + 8).take_while(|&j| j < keys) {
                        prefetch_kv(kv, j, kv_off, hd);
                    }
                    // Checked slices: the view's fields are public, so no trust in the table.
                    let rows: [&[f16]; 8] = std::array::from_fn(|l| {
                        if j0 + l < keys {
                            &kv.k[kv.row(j0 + l) + kv_off..][..hd]
                        } else {
                            &zero[..hd]
                        }
                    });
                    for d0 in (0..hd).step_by(8) {
                        let r: [__m128i; 8] = std::array::from_fn(|l| {
                            _mm_loadu_si128(rows[l].as_ptr().add(d0) as *const __m128i)
                        });
                        let t0 = _mm_unpacklo_epi16(r[0], r[1]);
                        let t1 = _mm_unpackhi_epi16(r[0], r[1]);
                        let t2 = _mm_unpacklo_epi16(r[2], r[3]);
                        let t3 = _mm_unpackhi_epi16(r[2], r[3]);
                        let t4 = _mm_unpacklo_epi16(r[4], r[5]);
                        let t5 = _mm_unpackhi_epi16(r[4], r[5]);
                        let t6 = _mm_unpacklo_epi16(r[6], r[7]);
                        let t7 = _mm_unpackhi_epi16(r[6], r[7]);
                        let u0 = _mm_unpacklo_epi32(t0, t2);
                        let u1 = _mm_unpackhi_epi32(t0, t2);
                        let u2 = _mm_unpacklo_epi32(t1, t3);
                        let u3 = _mm_unpackhi_epi32(t1, t3);
                        let u4 = _mm_unpacklo_epi32(t4, t6);
                        let u5 = _mm_unpackhi_epi32(t4, t6);
                        let u6 = _mm_unpacklo_epi32(t5, t7);
                        let u7 = _mm_unpackhi_epi32(t5, t7);
                        let cols = [
                            _mm_unpacklo_epi64(u0, u4),
                            _mm_unpackhi_epi64(u0, u4),
                            _mm_unpacklo_epi64(u1, u5),
                            _mm_unpackhi_epi64(u1, u5),
                            _mm_unpacklo_epi64(u2, u6),
                            _mm_unpackhi_epi64(u2, u6),
                            _mm_unpacklo_epi64(u3, u7),
                            _mm_unpackhi_epi64(u3, u7),
                        ];
                        for (i, c) in cols.iter().enumerate() {
                            let dst = &mut kt[(d0 + i) * width + j0 - span.start..][..8];
                            _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_cvtph_ps(*c));
                        }
                    }
                }
            }

            /// Asks for this head's key and value of position `j` ahead of use: the cache rows
            /// come from memory (a step's weights stream through the caches between layers),
            /// one line per key and value at a time without it.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn prefetch_kv(kv: KvView, j: usize, kv_off: usize, hd: usize) {
                let at = kv.row(j) + kv_off;
                for i in 0..(2 * hd).div_ceil(64) {
                    let k = (kv.k.as_ptr().wrapping_add(at) as *const i8).wrapping_add(64 * i);
                    let v = (kv.v.as_ptr().wrapping_add(at) as *const i8).wrapping_add(64 * i);
                    _mm_prefetch::<_MM_HINT_T0>(k);
                    _mm_prefetch::<_MM_HINT_T0>(v);
                }
            }

            /// `out[j] = sum over d of qh[d] * k[j][d]` for `j < seen` (rounded up to 8),
            /// the sum taken in element order with a separate multiply and add, 64 keys per
            /// pass (eight independent sums keep both adders busy despite their latency).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn scores(qh: &[f32], kt: &[f32], kpad: usize, seen: usize, out: &mut [f32]) {
                let hd = qh.len();
                let nvec = seen.div_ceil(8);
                assert!(nvec * 8 <= kpad && kt.len() >= hd * kpad && out.len() >= nvec * 8);
                let kp = kt.as_ptr();
                let mut v = 0;
                while v + 8 <= nvec {
                    let mut s = [_mm256_setzero_ps(); 8];
                    for (d, &qd) in qh.iter().enumerate() {
                        let qv = _mm256_set1_ps(qd);
                        let row = kp.add(d * kpad + v * 8);
                        for (u, acc) in s.iter_mut().enumerate() {
                            let k = _mm256_loadu_ps(row.add(u * 8));
                            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(qv, k));
                        }
                    }
                    for (u, acc) in s.iter().enumerate() {
                        _mm256_storeu_ps(out.as_mut_ptr().add((v + u) * 8), *acc);
                    }
                    v += 8;
                }
                while v < nvec {
                    let mut acc = _mm256_setzero_ps();
                    for (d, &qd) in qh.iter().enumerate() {
                        let k = _mm256_loadu_ps(kp.add(d * kpad + v * 8));
                        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(qd), k));
                    }
                    _mm256_storeu_ps(out.as_mut_ptr().add(v * 8), acc);
                    v += 1;
                }
            }

            /// The online softmax and f16 value accumulation of `nh` heads over the same keys
            /// (`scores` holds each head's scores, `kpad` apart); `acc` gets each head's
            /// normalised output in turn. Heads go `H` at a time, as many as keep their
            /// accumulators in registers.
            #[target_feature(enable = $features)]
            #[inline]
            #[allow(clippy::too_many_arguments)]
            unsafe fn accumulate_heads(
                scores: &[f32],
                kpad: usize,
                nh: usize,
                seen: usize,
                scale: f32,
                acc: &mut [f32],
                kv: KvView,
                kv_off: usize,
            ) {
                let hd = acc.len() / nh;
                let mut h = 0;
                while h < nh {
                    let left = nh - h;
                    let sc = &scores[h * kpad..];
                    let out = &mut acc[h * hd..];
                    if $wide {
                        let done =
                            wide::accumulate_some(sc, kpad, left, hd, seen, scale, out, kv, kv_off);
                        if done > 0 {
                            h += done;
                            continue;
                        }
                    }
                    let done = match hd / 8 {
                        8 if left >= 3 && 3 * 8 <= $max_acc_regs => {
                            accumulate::<8, 3>(sc, kpad, seen, scale, out, kv, kv_off)
                        }
                        8 if left >= 2 && 2 * 8 <= $max_acc_regs => {
                            accumulate::<8, 2>(sc, kpad, seen, scale, out, kv, kv_off)
                        }
                        8 => accumulate::<8, 1>(sc, kpad, seen, scale, out, kv, kv_off),
                        16 if left >= 2 && 2 * 16 <= $max_acc_regs => {
                            accumulate::<16, 2>(sc, kpad, seen, scale, out, kv, kv_off)
                        }
                        16 => accumulate::<16, 1>(sc, kpad, seen, scale, out, kv, kv_off),
                        _ => {
                            let out = &mut out[..hd];
                            super::accumulate(&sc[..seen], scale, out, kv, kv_off);
                            1
                        }
                    };
                    h += done;
                }
            }

            /// `H` heads of `8 * N` dimensions; returns `H`. Per head, exactly
            /// [`super::accumulate`]'s arithmetic.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn accumulate<const N: usize, const H: usize>(
                scores: &[f32],
                kpad: usize,
                seen: usize,
                scale: f32,
                acc: &mut [f32],
                kv: KvView,
                kv_off: usize,
            ) -> usize {
                assert!(acc.len() >= H * N * 8 && scores.len() >= (H - 1) * kpad + seen);
                let mut a = [[_mm_setzero_si128(); N]; H];
                let mut max = [f32::NEG_INFINITY; H];
                let mut sum = [0f32; H];
                for j in 0..seen {
                    let mut w = [_mm256_setzero_ps(); H];
                    for h in 0..H {
                        let s = *scores.get_unchecked(h * kpad + j) * scale;
                        let (ms, vs) = if s > max[h] {
                            let ms = (max[h] - s).exp();
                            max[h] = s;
                            let m = _mm256_set1_ps(ms);
                            for x in a[h].iter_mut() {
                                *x =
                                    _mm256_cvtps_ph(_mm256_mul_ps(_mm256_cvtph_ps(*x), m), NEAREST);
                            }
                            (ms, 1.0)
                        } else {
                            (1.0, (s - max[h]).exp())
                        };
                        sum[h] = sum[h] * ms + vs;
                        w[h] = _mm256_set1_ps(vs);
                    }
                    // A checked slice: the view's fields are public, so no trust in the table.
                    let row = &kv.v[kv.row(j) + kv_off..][..N * 8];
                    let v = row.as_ptr() as *const __m128i;
                    for i in 0..N {
                        let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.add(i)));
                        for h in 0..H {
                            a[h][i] = _mm256_cvtps_ph(
                                _mm256_fmadd_ps(vv, w[h], _mm256_cvtph_ps(a[h][i])),
                                NEAREST,
                            );
                        }
                    }
                }
                for h in 0..H {
                    for i in 0..N {
                        let mut out = [0f32; 8];
                        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(a[h][i]));
                        let dst = &mut acc[(h * N + i) * 8..][..8];
                        for (d, x) in dst.iter_mut().zip(out) {
                            *d = x / sum[h];
                        }
                    }
                }
                H
            }
        }
    };
}

// Accumulator registers a variant may use for several heads at once (of 16 and 32 vector
// registers). AVX2 at 16 spills a little but measured faster than one head at a time
// (forward/chunk/ctx1024/16: 68.6 vs 70.9 ms).
kernels!(avx2, "avx2,fma,f16c", 16, false);
kernels!(avx512, "avx2,fma,f16c,avx512f,avx512vl", 24, true);

/// The portable path's value accumulation ([`super::attention`]) with AVX2 + F16C, for any `head_dim` that is a multiple of 8, up to 256. (The task
/// kernels in `attention_x86` have register-resident versions for 64 and 128.)
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn accumulate(
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

/// Rounds every value to the nearest f16 (the portable path's `round_to_f16`).
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(crate) unsafe fn round_to_f16(x: &mut [f32]) {
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
