//! The AVX-512 attention task's inner loops at full width: sixteen keys per score vector
//! (scored a block of keys at a time by up to four queries per load) and sixteen dimensions
//! per value vector (the AVX2 kernels in [`super::attention_x86`] take eight). Every lane
//! does the arithmetic of the portable path in [`super::attention`] (same operations, same
//! order), so results are bit-identical; there are only half as many instructions, which is
//! what the value accumulation (an f16 round trip per key, head and vector) is bound by.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::attention::KvView;

const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

/// Keys a score vector holds: `kpad` (a row of scores) is a multiple of it.
pub(super) const LANES: usize = 16;

/// Keys a block holds: its transposed keys (`[head_dim][BLOCK]` f32, 16 KiB at 64
/// dimensions) stay in the L1 cache while every query of a block of rows scores them.
pub(super) const BLOCK: usize = 64;

/// The scores of `nh` queries (`qh`: f16-rounded, `head_dim` apart) against one
/// block of transposed keys (`kb`: `[head_dim][BLOCK]`, `len` keys, a multiple of 16), into
/// `out[h * kpad + at..]`. Up to four queries share each load of the keys; every score is
/// the portable path's sum (element order, multiply then add).
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn scores_heads(
    qh: &[f32],
    nh: usize,
    kb: &[f32],
    len: usize,
    out: &mut [f32],
    kpad: usize,
    at: usize,
) {
    let hd = qh.len() / nh;
    assert!(len.is_multiple_of(LANES) && len <= BLOCK && kb.len() >= hd * BLOCK);
    assert!(qh.len() == nh * hd && at + len <= kpad && out.len() >= nh * kpad);
    let mut h = 0;
    while h < nh {
        let q = &qh[h * hd..];
        let o = &mut out[h * kpad + at..];
        h += match (nh - h, len / LANES) {
            (1, 4) => block::<1, 4>(q, hd, kb, o, kpad),
            (2, 4) => block::<2, 4>(q, hd, kb, o, kpad),
            (3, 4) => block::<3, 4>(q, hd, kb, o, kpad),
            (_, 4) => block::<4, 4>(q, hd, kb, o, kpad),
            (1, 3) => block::<1, 3>(q, hd, kb, o, kpad),
            (2, 3) => block::<2, 3>(q, hd, kb, o, kpad),
            (3, 3) => block::<3, 3>(q, hd, kb, o, kpad),
            (_, 3) => block::<4, 3>(q, hd, kb, o, kpad),
            (1, 2) => block::<1, 2>(q, hd, kb, o, kpad),
            (2, 2) => block::<2, 2>(q, hd, kb, o, kpad),
            (3, 2) => block::<3, 2>(q, hd, kb, o, kpad),
            (_, 2) => block::<4, 2>(q, hd, kb, o, kpad),
            (1, _) => block::<1, 1>(q, hd, kb, o, kpad),
            (2, _) => block::<2, 1>(q, hd, kb, o, kpad),
            (3, _) => block::<3, 1>(q, hd, kb, o, kpad),
            (_, _) => block::<4, 1>(q, hd, kb, o, kpad),
        };
    }
}

/// `H` queries' scores for `V` vectors of keys of one block; returns `H`.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn block<const H: usize, const V: usize>(
    qh: &[f32],
    hd: usize,
    kb: &[f32],
    out: &mut [f32],
    kpad: usize,
) -> usize {
    assert!(V * LANES <= BLOCK && kb.len() >= hd * BLOCK);
    assert!(qh.len() >= H * hd && out.len() >= (H - 1) * kpad + V * LANES);
    let mut s = [[_mm512_setzero_ps(); V]; H];
    let kp = kb.as_ptr();
    for d in 0..hd {
        let k: [__m512; V] =
            std::array::from_fn(|u| _mm512_loadu_ps(kp.add(d * BLOCK + u * LANES)));
        for (h, s) in s.iter_mut().enumerate() {
            let qv = _mm512_set1_ps(*qh.get_unchecked(h * hd + d));
            for (acc, k) in s.iter_mut().zip(&k) {
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(qv, *k));
            }
        }
    }
    for (h, s) in s.iter().enumerate() {
        for (u, acc) in s.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(h * kpad + u * LANES), *acc);
        }
    }
    H
}

/// The online softmax and f16 value accumulation of as many of the `nh` heads as fit in
/// registers at once (`scores` holds each head's scores, `kpad` apart); returns how many
/// it did, or 0 when `head_dim` is not 64 or 128 (the caller's narrower code then runs).
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn accumulate_some(
    scores: &[f32],
    kpad: usize,
    left: usize,
    hd: usize,
    seen: usize,
    scale: f32,
    acc: &mut [f32],
    kv: KvView,
    kv_off: usize,
) -> usize {
    match (hd, left) {
        (64, 4..) => accumulate::<4, 4>(scores, kpad, seen, scale, acc, kv, kv_off),
        (64, 3) => accumulate::<4, 3>(scores, kpad, seen, scale, acc, kv, kv_off),
        (64, 2) => accumulate::<4, 2>(scores, kpad, seen, scale, acc, kv, kv_off),
        (64, _) => accumulate::<4, 1>(scores, kpad, seen, scale, acc, kv, kv_off),
        (128, 2..) => accumulate::<8, 2>(scores, kpad, seen, scale, acc, kv, kv_off),
        (128, _) => accumulate::<8, 1>(scores, kpad, seen, scale, acc, kv, kv_off),
        _ => 0,
    }
}

/// `H` heads of `16 * N` dimensions; returns `H`. Per head and lane, exactly the portable
/// path's arithmetic: a new maximum rescales the f16 accumulator, each key adds its weighted
/// value with one FMA, and the accumulator is rounded to f16 after every update.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // a[h][i] for every head h of vector i reads plainer
unsafe fn accumulate<const N: usize, const H: usize>(
    scores: &[f32],
    kpad: usize,
    seen: usize,
    scale: f32,
    acc: &mut [f32],
    kv: KvView,
    kv_off: usize,
) -> usize {
    assert!(acc.len() >= H * N * LANES && scores.len() >= (H - 1) * kpad + seen);
    let mut a = [[_mm256_setzero_si256(); N]; H];
    let mut max = [f32::NEG_INFINITY; H];
    let mut sum = [0f32; H];
    for j in 0..seen {
        let mut w = [_mm512_setzero_ps(); H];
        for h in 0..H {
            let s = *scores.get_unchecked(h * kpad + j) * scale;
            let (ms, vs) = if s > max[h] {
                let ms = (max[h] - s).exp();
                max[h] = s;
                let m = _mm512_set1_ps(ms);
                for x in a[h].iter_mut() {
                    *x = _mm512_cvtps_ph(_mm512_mul_ps(_mm512_cvtph_ps(*x), m), NEAREST);
                }
                (ms, 1.0)
            } else {
                (1.0, (s - max[h]).exp())
            };
            sum[h] = sum[h] * ms + vs;
            w[h] = _mm512_set1_ps(vs);
        }
        // A checked slice: the view's fields are public, so no trust in the table.
        let row = &kv.v[kv.row(j) + kv_off..][..N * LANES];
        let v = row.as_ptr() as *const __m256i;
        for i in 0..N {
            let vv = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(i)));
            for h in 0..H {
                a[h][i] =
                    _mm512_cvtps_ph(_mm512_fmadd_ps(vv, w[h], _mm512_cvtph_ps(a[h][i])), NEAREST);
            }
        }
    }
    for h in 0..H {
        for i in 0..N {
            let mut out = [0f32; LANES];
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_cvtph_ps(a[h][i]));
            let dst = &mut acc[(h * N + i) * LANES..][..LANES];
            for (d, x) in dst.iter_mut().zip(out) {
                *d = x / sum[h];
            }
        }
    }
    H
}
