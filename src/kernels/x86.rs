//! AVX2 block dot products (chosen at run time), bit-identical to the portable ones in
//! [`super::quant`]: the integer lane sums are exact, and the float steps (scale products, one
//! FMA per lane per block, the final horizontal sum) happen in the same order. Also the
//! AVX-512 activation quantization.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::quant::{Q8Row, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, QK};
use half::f16;

/// True when this CPU runs the kernels below.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[inline(always)]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// llama.cpp's `hsum_float_8` order.
#[inline(always)]
pub(crate) unsafe fn hsum8(x: __m256) -> f32 {
    let mut res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// 32 nibbles -> 32 bytes: low nibbles are values 0..16, high nibbles 16..32.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Unsigned x signed bytes -> eight i32 lanes of four products each, as floats.
#[inline(always)]
unsafe fn lanes_us(x: __m256i, y: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(x, y);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// Signed x signed bytes, through |x| and y with x's sign.
#[inline(always)]
unsafe fn lanes_ss(x: __m256i, y: __m256i) -> __m256 {
    lanes_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds `a.d.len()` Q4_1 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1(w: &[u8], a: &Q8Row) -> f32 {
    debug_assert!(w.len() >= a.d.len() * Q4_1_BYTES);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for b in 0..a.d.len() {
        let blk = w.as_ptr().add(b * Q4_1_BYTES);
        let d = f16_at(blk) * a.d[b];
        summs += f16_at(blk.add(2)) * a.s[b];
        let qy = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), lanes_us(nibbles(blk.add(4)), qy), acc);
    }
    hsum8(acc) + summs
}

/// # Safety
/// As [`dot_q4_1`], for Q4_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0(w: &[u8], a: &Q8Row) -> f32 {
    debug_assert!(w.len() >= a.d.len() * Q4_0_BYTES);
    let mut acc = _mm256_setzero_ps();
    for b in 0..a.d.len() {
        let blk = w.as_ptr().add(b * Q4_0_BYTES);
        let d = f16_at(blk) * a.d[b];
        let qx = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
        let qy = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), lanes_ss(qx, qy), acc);
    }
    hsum8(acc)
}

/// # Safety
/// As [`dot_q4_1`], for Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0(w: &[u8], a: &Q8Row) -> f32 {
    debug_assert!(w.len() >= a.d.len() * Q8_0_BYTES);
    let mut acc = _mm256_setzero_ps();
    for b in 0..a.d.len() {
        let blk = w.as_ptr().add(b * Q8_0_BYTES);
        let d = f16_at(blk) * a.d[b];
        let qx = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let qy = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), lanes_ss(qx, qy), acc);
    }
    hsum8(acc)
}

/// Four weight rows against one activation row (a decode step's product): each result
/// computed exactly as by [`dot_q4_1`], [`dot_q4_0`] or [`dot_q8_0`] (the same operations in
/// the same order), the four rows' chains interleaved so that their latencies and their
/// weight loads overlap instead of one row's at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (the lengths are checked).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows4(kind: super::quant::WeightKind, w: [&[u8]; 4], a: &Q8Row) -> [f32; 4] {
    use super::quant::WeightKind;
    match kind {
        WeightKind::Q4_1 => rows4_with(w, a, Q4_1_BYTES, true, |blk, qy| {
            lanes_us(nibbles(blk.add(4)), qy)
        }),
        WeightKind::Q4_0 => rows4_with(w, a, Q4_0_BYTES, false, |blk, qy| {
            lanes_ss(
                _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8)),
                qy,
            )
        }),
        WeightKind::Q8_0 => rows4_with(w, a, Q8_0_BYTES, false, |blk, qy| {
            lanes_ss(_mm256_loadu_si256(blk.add(2) as *const __m256i), qy)
        }),
    }
}

/// How many blocks ahead [`dot_rows4`] asks for its rows' weights: 8 gave 1.1x decode on the
/// default model (AVX2 kernels on an AVX-512 Xeon); 16 measured the same.
const PF_AHEAD: usize = 8;

#[inline(always)]
unsafe fn rows4_with(
    w: [&[u8]; 4],
    a: &Q8Row,
    bytes: usize,
    with_min: bool,
    lanes: impl Fn(*const u8, __m256i) -> __m256,
) -> [f32; 4] {
    let nb = a.d.len();
    assert!(
        w.iter().all(|w| w.len() >= nb * bytes)
            && a.qs.len() >= nb * QK
            && (!with_min || a.s.len() >= nb)
    );
    let p = w.map(<[u8]>::as_ptr);
    let half = |r: usize, off: usize| std::ptr::read_unaligned(p[r].add(off) as *const i16);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = _mm_setzero_ps();
    for b in 0..nb {
        let qy = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
        let off = b * bytes;
        // The four rows' scales widened by one instruction and multiplied by one: lane by
        // lane the same f32 products (and minimum sums) as one row at a time.
        let h = _mm_setr_epi16(
            half(0, off),
            half(1, off),
            half(2, off),
            half(3, off),
            0,
            0,
            0,
            0,
        );
        let d = _mm_mul_ps(_mm_cvtph_ps(h), _mm_set1_ps(*a.d.get_unchecked(b)));
        let d = _mm256_castps128_ps256(d);
        if with_min {
            let (o, s) = (off + 2, *a.s.get_unchecked(b));
            let h = _mm_setr_epi16(half(0, o), half(1, o), half(2, o), half(3, o), 0, 0, 0, 0);
            summs = _mm_add_ps(summs, _mm_mul_ps(_mm_cvtph_ps(h), _mm_set1_ps(s)));
        }
        for r in 0..4 {
            let blk = p[r].add(off);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF_AHEAD * bytes) as *const i8);
            let dr = _mm256_permutevar8x32_ps(d, _mm256_set1_epi32(r as i32));
            acc[r] = _mm256_fmadd_ps(dr, lanes(blk, qy), acc[r]);
        }
    }
    let mut sm = [0f32; 4];
    _mm_storeu_ps(sm.as_mut_ptr(), summs);
    // Without a minimum, no `+ 0.0` (it would turn a -0.0 into +0.0).
    std::array::from_fn(|r| {
        if with_min {
            hsum8(acc[r]) + sm[r]
        } else {
            hsum8(acc[r])
        }
    })
}

/// The activation scales of four input rows side by side, block by block: `d[b][r]` and
/// `s[b][r]` are row `r`'s `d[b]` and `s[b]` ([`Q8Row`]). Built once per matrix product and
/// shared by every weight row.
#[derive(Debug, Default, Clone)]
pub struct Quad {
    pub d: Vec<[f32; 4]>,
    pub s: Vec<[f32; 4]>,
}

impl Quad {
    pub fn new(a: [&Q8Row; 4]) -> Self {
        let nb = a[0].d.len();
        Self {
            d: (0..nb)
                .map(|b| std::array::from_fn(|r| a[r].d[b]))
                .collect(),
            s: (0..nb)
                .map(|b| std::array::from_fn(|r| a[r].s[b]))
                .collect(),
        }
    }
}

/// One weight row's block scales (and Q4_1 minimums) widened to f32, read once per weight
/// row instead of once per group of input rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds `nb` blocks of `kind`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn row_scales(
    kind: super::quant::WeightKind,
    w: &[u8],
    nb: usize,
    d: &mut Vec<f32>,
    m: &mut Vec<f32>,
) {
    use super::quant::WeightKind;
    let bytes = kind.block_bytes();
    assert!(w.len() >= nb * bytes);
    let with_min = kind == WeightKind::Q4_1;
    d.resize(nb, 0.0);
    if with_min {
        m.resize(nb, 0.0);
    } else {
        m.clear();
    }
    // Eight blocks' halves gathered on the stack, then widened by one instruction.
    let p = w.as_ptr();
    let half =
        |b: usize, off: usize| std::ptr::read_unaligned(p.add(b * bytes + off) as *const u16);
    let mut b = 0;
    while b + 8 <= nb {
        let hd: [u16; 8] = std::array::from_fn(|i| half(b + i, 0));
        let wide = _mm256_cvtph_ps(_mm_loadu_si128(hd.as_ptr() as *const __m128i));
        _mm256_storeu_ps(d.as_mut_ptr().add(b), wide);
        if with_min {
            let hm: [u16; 8] = std::array::from_fn(|i| half(b + i, 2));
            let wide = _mm256_cvtph_ps(_mm_loadu_si128(hm.as_ptr() as *const __m128i));
            _mm256_storeu_ps(m.as_mut_ptr().add(b), wide);
        }
        b += 8;
    }
    for b in b..nb {
        let blk = p.add(b * bytes);
        d[b] = f16_at(blk);
        if with_min {
            m[b] = f16_at(blk.add(2));
        }
    }
}

macro_rules! dot4_quad {
    ($name:ident, $features:literal, $lanes:ident) => {
        /// Four activation rows against one weight row at once: each weight block is
        /// expanded once for the four rows; the per-block scale products of the four rows
        /// come from one vector multiply (`dw[b] * quad.d[b]`) read back by broadcast loads,
        /// and the four Q4_1 offset sums share one vector. Each result is computed exactly
        /// as by the single-row kernels (same operations in the same order).
        ///
        /// # Safety
        /// The CPU must have the function's features; `dw` (and for Q4_1 `mw`) hold the
        /// weight row's `nb` scales from [`row_scales`]; `quad` was built from `a`.
        #[target_feature(enable = $features)]
        pub unsafe fn $name(
            kind: super::quant::WeightKind,
            w: &[u8],
            dw: &[f32],
            mw: &[f32],
            a: [&Q8Row; 4],
            quad: &Quad,
        ) -> [f32; 4] {
            use super::quant::WeightKind;
            let nb = a[0].d.len();
            let bytes = kind.block_bytes();
            assert!(
                w.len() >= nb * bytes
                    && dw.len() >= nb
                    && quad.d.len() >= nb
                    && (kind != WeightKind::Q4_1 || (mw.len() >= nb && quad.s.len() >= nb))
            );
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut summs = _mm_setzero_ps();
            let mut dp = [0f32; 4];
            for b in 0..nb {
                let blk = w.as_ptr().add(b * bytes);
                let prod = _mm_mul_ps(
                    _mm_broadcast_ss(dw.get_unchecked(b)),
                    _mm_loadu_ps(quad.d.get_unchecked(b).as_ptr()),
                );
                _mm_storeu_ps(dp.as_mut_ptr(), prod);
                let (qx, signed) = match kind {
                    WeightKind::Q4_1 => {
                        let m = _mm_broadcast_ss(mw.get_unchecked(b));
                        let s = _mm_loadu_ps(quad.s.get_unchecked(b).as_ptr());
                        summs = _mm_add_ps(summs, _mm_mul_ps(m, s));
                        (nibbles(blk.add(4)), false)
                    }
                    WeightKind::Q4_0 => (
                        _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8)),
                        true,
                    ),
                    WeightKind::Q8_0 => (_mm256_loadu_si256(blk.add(2) as *const __m256i), true),
                };
                let (ax, sx) = if signed {
                    (_mm256_sign_epi8(qx, qx), qx)
                } else {
                    (qx, _mm256_set1_epi8(1))
                };
                for r in 0..4 {
                    let qy = _mm256_loadu_si256(a[r].qs.as_ptr().add(b * QK) as *const __m256i);
                    let qy = if signed { _mm256_sign_epi8(qy, sx) } else { qy };
                    let d = _mm256_broadcast_ss(&dp[r]);
                    acc[r] = _mm256_fmadd_ps(d, $lanes(ax, qy), acc[r]);
                }
            }
            let mut sm = [0f32; 4];
            _mm_storeu_ps(sm.as_mut_ptr(), summs);
            let mut out = [0f32; 4];
            for r in 0..4 {
                out[r] = match kind {
                    WeightKind::Q4_1 => hsum8(acc[r]) + sm[r],
                    _ => hsum8(acc[r]),
                };
            }
            out
        }
    };
}

/// [`lanes_us`] in one VNNI instruction: the same exact i32 lane sums (the products of
/// unsigned nibbles or |x| by signed bytes never saturate `maddubs`' i16 pairs here).
#[inline(always)]
unsafe fn lanes_us_vnni(x: __m256i, y: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y))
}

dot4_quad!(dot4_quad, "avx2,fma,f16c", lanes_us);
dot4_quad!(
    dot4_quad_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    lanes_us_vnni
);

/// True when this CPU has AVX-512 VNNI with VL (and `EDGEINFER_NO_AVX512` is unset).
pub fn vnni_available() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && !super::env_flag("EDGEINFER_NO_AVX512")
    })
}

/// [`super::quant::quantize_row`] with AVX-512: a block's 32 values in two registers, the
/// largest magnitude by vector max, `round(x * id)` by one conversion (the default rounding
/// mode is half to even), the sum by a vector reduction. The same bytes and scales as the
/// portable code (every step is exact or the same IEEE operation); a block holding a NaN or
/// an infinity, or so small that `127 / amax` overflows, goes through the portable code,
/// whose saturating conversions the vector ones do not share.
///
/// # Safety
/// The CPU must support AVX-512F and BW; `x.len()` is a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_row_avx512(x: &[f32], out: &mut Q8Row) {
    assert!(x.len().is_multiple_of(QK));
    let nb = x.len() / QK;
    out.d.clear();
    out.s.clear();
    out.qs.clear();
    out.qs.reserve(x.len());
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    for b in 0..nb {
        let p = x.as_ptr().add(b * QK);
        let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), abs_mask));
        let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), abs_mask));
        // Infinities and NaNs (whose magnitudes compare unordered or infinite) show in amax.
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a0, a1);
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        if nan != 0 || !amax.is_finite() || !id.is_finite() {
            super::quant::quantize_block(&x[b * QK..][..QK], out);
            continue;
        }
        let vid = _mm512_set1_ps(id);
        let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
        let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        // Into the reserved capacity: blocks `0..b` are written, so `len == b * QK`.
        let dst = out.qs.as_mut_ptr().add(b * QK);
        _mm_storeu_si128(dst as *mut __m128i, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(dst.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
        out.qs.set_len((b + 1) * QK);
        out.d.push(f16::from_f32(d).to_f32());
        out.s.push(f16::from_f32(d * sum as f32).to_f32());
    }
}
