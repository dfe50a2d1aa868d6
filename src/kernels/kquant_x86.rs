//! AVX2 K-quant kernels: unpacking a weight row, and its integer sums against up to four
//! Q8_K rows at once. Bit-identical to the portable code in [`super::kquant`] (the unpacked
//! bytes are the same; integer sums are exact; the float steps are the shared `combine`).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::kquant::quantize_row_q8k_portable;
use super::kquant::{KKind, KMatrix, KRow, Q8KRow, QK_K};
use super::x86::{f16_at, hsum8};

/// Unpacks one weight row, as [`super::kquant::unpack_row`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn unpack_row(kind: KKind, w: &[u8], out: &mut KRow) {
    let bytes = kind.block_bytes();
    out.resize(w.len() / bytes);
    let m4 = _mm256_set1_epi8(0x0F);
    for (b, blk) in w.chunks_exact(bytes).enumerate() {
        write_scales(kind, blk, b, out);
        let src = blk.as_ptr();
        let dst = out.q.as_mut_ptr().add(b * QK_K);
        let load = |off: usize| _mm256_loadu_si256(src.add(off) as *const __m256i);
        let store = |off: usize, v: __m256i| _mm256_storeu_si256(dst.add(off) as *mut __m256i, v);
        match kind {
            KKind::Q4K => {
                for j in 0..4 {
                    let x = load(16 + 32 * j);
                    store(64 * j, _mm256_and_si256(x, m4));
                    store(64 * j + 32, _mm256_and_si256(_mm256_srli_epi16(x, 4), m4));
                }
            }
            KKind::Q5K => {
                let qh = load(16);
                let sixteen = _mm256_set1_epi8(16);
                // 16 where `qh` has bit `m` set.
                let bit = |m: u8| {
                    let m = _mm256_set1_epi8(m as i8);
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m), sixteen)
                };
                for j in 0..4 {
                    let x = load(48 + 32 * j);
                    let lo = _mm256_add_epi8(_mm256_and_si256(x, m4), bit(1 << (2 * j)));
                    let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
                    store(64 * j, lo);
                    store(64 * j + 32, _mm256_add_epi8(hi, bit(2 << (2 * j))));
                }
            }
            KKind::Q6K => {
                let m30 = _mm256_set1_epi8(0x30);
                for half in 0..2 {
                    let (ql0, ql1) = (load(64 * half), load(64 * half + 32));
                    let qh = load(128 + 32 * half);
                    let (lo0, lo1) = (_mm256_and_si256(ql0, m4), _mm256_and_si256(ql1, m4));
                    let hi0 = _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4);
                    let hi1 = _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4);
                    let h = |v: __m256i| _mm256_and_si256(v, m30);
                    let base = 128 * half;
                    store(base, _mm256_or_si256(lo0, h(_mm256_slli_epi16(qh, 4))));
                    store(base + 32, _mm256_or_si256(lo1, h(_mm256_slli_epi16(qh, 2))));
                    store(base + 64, _mm256_or_si256(hi0, h(qh)));
                    store(base + 96, _mm256_or_si256(hi1, h(_mm256_srli_epi16(qh, 2))));
                }
            }
        }
    }
}

/// Eight bytes -> sixteen i16, each repeated (a 32-value sub-block's scale for both of its
/// 16-value groups).
#[inline(always)]
unsafe fn widen_twice(v: u64) -> __m256i {
    let w = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(v as i64));
    _mm256_set_m128i(_mm_unpackhi_epi16(w, w), _mm_unpacklo_epi16(w, w))
}

/// [`super::kquant::write_scales`] without the per-group branching: the twelve scale bytes of
/// Q4_K / Q5_K decoded four at a time.
#[inline(always)]
unsafe fn write_scales(kind: KKind, blk: &[u8], sb: usize, out: &mut KRow) {
    let p = blk.as_ptr();
    let (sc, mn) = (
        out.sc.as_mut_ptr().add(16 * sb),
        out.mn.as_mut_ptr().add(16 * sb),
    );
    match kind {
        KKind::Q4K | KKind::Q5K => {
            out.d[sb] = f16_at(p);
            out.dmin[sb] = f16_at(p.add(2));
            let word = |i: usize| u32::from_le_bytes(blk[4 + 4 * i..8 + 4 * i].try_into().unwrap());
            let (a0, a1, a2) = (word(0), word(1), word(2));
            let sc_lo = a0 & 0x3f3f_3f3f;
            let mn_lo = a1 & 0x3f3f_3f3f;
            let sc_hi = (a2 & 0x0f0f_0f0f) | (((a0 >> 6) & 0x0303_0303) << 4);
            let mn_hi = ((a2 >> 4) & 0x0f0f_0f0f) | (((a1 >> 6) & 0x0303_0303) << 4);
            let join = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
            _mm256_storeu_si256(sc as *mut __m256i, widen_twice(join(sc_lo, sc_hi)));
            _mm256_storeu_si256(mn as *mut __m256i, widen_twice(join(mn_lo, mn_hi)));
        }
        KKind::Q6K => {
            let d = f16_at(p.add(208));
            out.d[sb] = d;
            out.dmin[sb] = d;
            let s = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i));
            _mm256_storeu_si256(sc as *mut __m256i, s);
            _mm256_storeu_si256(mn as *mut __m256i, _mm256_slli_epi16(s, 5));
        }
    }
}

/// The scales of super-block `sb` in f32: `d * da` and `-(dmin * da)` for each row.
#[inline(always)]
fn factors<const R: usize>(w: &KRow, sb: usize, a: [&Q8KRow; R]) -> [(f32, f32); R] {
    std::array::from_fn(|r| (w.d[sb] * a[r].d[sb], -(w.dmin[sb] * a[r].d[sb])))
}

/// `R` activation rows against one unpacked weight row, sharing each weight load, in the
/// lane layout of [`super::kquant::dot`]: per super-block the integer lanes are converted
/// and added into f32 lanes with one FMA, and summed across lanes once at the end.
/// 256-bit: lanes 0..8 and 8..16 of the sixteen are two registers (even and odd 32-value
/// chunks).
#[inline(always)]
unsafe fn dots256<const R: usize>(w: &KRow, a: [&Q8KRow; R]) -> [f32; R] {
    let mut acc_lo = [_mm256_setzero_ps(); R];
    let mut acc_hi = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm256_setzero_ps(); R];
    for sb in 0..a[0].d.len() {
        let q = w.q.as_ptr().add(sb * QK_K);
        let sc = w.sc.as_ptr().add(sb * 16);
        let mut lo = [_mm256_setzero_si256(); R];
        let mut hi = [_mm256_setzero_si256(); R];
        for c in 0..8 {
            let qv = _mm256_loadu_si256(q.add(32 * c) as *const __m256i);
            // Values 32c..32c+16 take group 2c's scale, the next 16 group 2c+1's.
            let s = _mm256_set_m128i(
                _mm_set1_epi16(*sc.add(2 * c + 1)),
                _mm_set1_epi16(*sc.add(2 * c)),
            );
            for r in 0..R {
                let x =
                    _mm256_loadu_si256(a[r].qs.as_ptr().add(sb * QK_K + 32 * c) as *const __m256i);
                // |products| <= 63 * 127, pairs <= 16002: `maddubs` never saturates.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qv, x), s);
                if c % 2 == 0 {
                    lo[r] = _mm256_add_epi32(lo[r], p);
                } else {
                    hi[r] = _mm256_add_epi32(hi[r], p);
                }
            }
        }
        let mn = _mm256_loadu_si256(w.mn.as_ptr().add(sb * 16) as *const __m256i);
        let f = factors(w, sb, a);
        for r in 0..R {
            let d = _mm256_set1_ps(f[r].0);
            acc_lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[r]), d, acc_lo[r]);
            acc_hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi[r]), d, acc_hi[r]);
            let b = _mm256_loadu_si256(a[r].bsums.as_ptr().add(sb * 16) as *const __m256i);
            let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mn, b));
            acc_m[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(f[r].1), acc_m[r]);
        }
    }
    std::array::from_fn(|r| hsum8(_mm256_add_ps(acc_lo[r], acc_hi[r])) + hsum8(acc_m[r]))
}

/// [`dots256`] with 512-bit vectors (AVX-512BW): 64 values per instruction; the four group
/// scales of each 64 values are spread to their lanes with one permute.
#[inline(always)]
unsafe fn dots512<const R: usize>(w: &KRow, a: [&Q8KRow; R]) -> [f32; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_m = [_mm256_setzero_ps(); R];
    // i16 lane j of a product covers values 2j, 2j+1: group j / 8 of the 64.
    let lane_group = _mm512_srli_epi16(
        _mm512_set_epi16(
            31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10,
            9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
        ),
        3,
    );
    for sb in 0..a[0].d.len() {
        let q = w.q.as_ptr().add(sb * QK_K);
        let sc = _mm512_castsi256_si512(_mm256_loadu_si256(
            w.sc.as_ptr().add(sb * 16) as *const __m256i
        ));
        let mut lanes = [_mm512_setzero_si512(); R];
        for c in 0..4 {
            let qv = _mm512_loadu_si512(q.add(64 * c) as *const _);
            let idx = _mm512_add_epi16(lane_group, _mm512_set1_epi16(4 * c as i16));
            let s = _mm512_permutexvar_epi16(idx, sc);
            for r in 0..R {
                let x = _mm512_loadu_si512(a[r].qs.as_ptr().add(sb * QK_K + 64 * c) as *const _);
                let p = _mm512_madd_epi16(_mm512_maddubs_epi16(qv, x), s);
                lanes[r] = _mm512_add_epi32(lanes[r], p);
            }
        }
        let mn = _mm256_loadu_si256(w.mn.as_ptr().add(sb * 16) as *const __m256i);
        let f = factors(w, sb, a);
        for r in 0..R {
            let d = _mm512_set1_ps(f[r].0);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes[r]), d, acc[r]);
            let b = _mm256_loadu_si256(a[r].bsums.as_ptr().add(sb * 16) as *const __m256i);
            let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mn, b));
            acc_m[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(f[r].1), acc_m[r]);
        }
    }
    std::array::from_fn(|r| {
        let halves = _mm256_add_ps(
            _mm512_castps512_ps256(acc[r]),
            _mm512_extractf32x8_ps(acc[r], 1),
        );
        hsum8(halves) + hsum8(acc_m[r])
    })
}

#[inline(always)]
unsafe fn dots<const R: usize, const WIDE: bool>(w: &KRow, a: [&Q8KRow; R]) -> [f32; R] {
    if WIDE {
        dots512(w, a)
    } else {
        dots256(w, a)
    }
}

/// `out` (`[rows_in_task, n]`) for the weight rows from `first`: each row is unpacked once,
/// then applied to the input rows four at a time, with 512-bit vectors where the CPU has
/// AVX-512BW (and `EDGEINFER_NO_AVX512` is unset).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
pub unsafe fn rows(m: &KMatrix, first: usize, out: &mut [f32], acts: &[Q8KRow]) {
    if wide_available() {
        rows512(m, first, out, acts)
    } else {
        rows256(m, first, out, acts)
    }
}

/// True when this CPU has AVX-512F and BW (and `EDGEINFER_NO_AVX512` is unset).
pub fn wide_available() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        super::x86::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && !super::env_flag("EDGEINFER_NO_AVX512")
    })
}

macro_rules! rows_with {
    ($name:ident, $features:literal, $wide:literal) => {
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(m: &KMatrix, first: usize, out: &mut [f32], acts: &[Q8KRow]) {
            let n = acts.len();
            assert!(acts.iter().all(|a| a.qs.len() == m.cols));
            let mut w = KRow::default();
            for (local, out_row) in out.chunks_exact_mut(n).enumerate() {
                unpack_row(m.kind, m.row(first + local), &mut w);
                assert_eq!(w.q.len(), m.cols);
                let quads = n / 4 * 4;
                for (o, a) in out_row[..quads]
                    .chunks_exact_mut(4)
                    .zip(acts.chunks_exact(4))
                {
                    o.copy_from_slice(&dots::<4, $wide>(&w, [&a[0], &a[1], &a[2], &a[3]]));
                }
                for (o, a) in out_row[quads..].iter_mut().zip(&acts[quads..]) {
                    *o = dots::<1, $wide>(&w, [a])[0];
                }
            }
        }
    };
}

rows_with!(rows256, "avx2,fma,f16c", false);
rows_with!(rows512, "avx2,fma,f16c,avx512f,avx512bw", true);

/// One weight row against one activation row (tests compare it with the portable `dot`).
///
/// # Safety
/// As [`rows`]; `w` was unpacked from a row of `a`'s length.
#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot(w: &KRow, a: &Q8KRow) -> f32 {
    dots::<1, false>(w, [a])[0]
}

/// [`super::kquant::quantize_row_q8k`] with AVX2: the largest magnitude by vector max (the
/// first value reaching it gives the sign, as in the portable scan), products rounded half to
/// even by `cvtps2dq` (the default rounding mode), the same bytes as the portable code.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8k(x: &[f32], out: &mut Q8KRow) {
    assert!(x.len().is_multiple_of(QK_K));
    let nb = x.len() / QK_K;
    out.d.clear();
    out.qs.resize(x.len(), 0);
    out.bsums.clear();
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (b, block) in x.chunks_exact(QK_K).enumerate() {
        let p = block.as_ptr();
        let (mut vmax, mut nan) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in 0..QK_K / 8 {
            let v = _mm256_loadu_ps(p.add(8 * i));
            vmax = _mm256_max_ps(_mm256_and_ps(v, abs_mask), vmax);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        let qs = &mut out.qs[b * QK_K..][..QK_K];
        if amax == 0.0 || !amax.is_finite() || _mm256_movemask_ps(nan) != 0 {
            // All zero, or a NaN or infinity: the portable code's exact behaviour.
            let mut one = Q8KRow::default();
            quantize_row_q8k_portable(block, &mut one);
            qs.copy_from_slice(&one.qs);
            out.d.push(one.d[0]);
            out.bsums.extend_from_slice(&one.bsums);
            continue;
        }
        let max = *block
            .iter()
            .find(|v| v.abs() == amax)
            .expect("the maximum is in the block");
        let iscale = -127.0 / max;
        let vs = _mm256_set1_ps(iscale);
        let top = _mm256_set1_epi32(127);
        let q = |i: usize| {
            let v = _mm256_mul_ps(vs, _mm256_loadu_ps(p.add(8 * i)));
            _mm256_min_epi32(_mm256_cvtps_epi32(v), top)
        };
        for i in 0..QK_K / 32 {
            let a = _mm256_permute4x64_epi64(_mm256_packs_epi32(q(4 * i), q(4 * i + 1)), 0xD8);
            let c = _mm256_permute4x64_epi64(_mm256_packs_epi32(q(4 * i + 2), q(4 * i + 3)), 0xD8);
            let bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, c), 0xD8);
            _mm256_storeu_si256(qs.as_mut_ptr().add(32 * i) as *mut __m256i, bytes);
        }
        out.bsums.extend(
            qs.chunks_exact(16)
                .map(|g| g.iter().map(|&q| q as i16).sum::<i16>()),
        );
        out.d.push(1.0 / iscale);
    }
    debug_assert_eq!(out.d.len(), nb);
}
