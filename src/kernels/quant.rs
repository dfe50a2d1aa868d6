//! Quantized blocks of 32 values (GGML's Q4_0, Q4_1, Q8_0 weights; Q8_0 / Q8_1 activations):
//! activation quantization and block dot products.
//!
//! Arithmetic follows llama.cpp's x86 code step for step (rounding half to even, the scale
//! kept in f16, eight f32 lanes of four products each, the same final horizontal sum), so
//! our logits track llama.cpp's closely enough to agree on greedy tokens.

use half::f16;

use candle_core::quantized::GgmlDType;

pub const QK: usize = 32;
pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;
pub const Q8_0_BYTES: usize = 34;

/// The 32-value block formats a weight matrix may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl WeightKind {
    pub(super) fn from_dtype(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => Q4_0_BYTES,
            Self::Q4_1 => Q4_1_BYTES,
            Self::Q8_0 => Q8_0_BYTES,
        }
    }
}

/// One row of activations quantized to 8 bits per value, 32 values a block.
#[derive(Debug, Clone, Default)]
pub struct Q8Row {
    /// Per block: the scale as stored (f16, widened).
    pub d: Vec<f32>,
    /// Per block: `scale * sum(qs)` as stored (f16, widened); used by Q4_1's offset term.
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

/// Quantizes `x` (a multiple of 32 long) the way llama.cpp's `quantize_row_q8_1` does;
/// `d` and `qs` alone are exactly its `quantize_row_q8_0`. With AVX-512 sixteen values at a
/// time, else compiled for AVX2 (rounding is then one instruction), with identical results.
pub fn quantize_row(x: &[f32], out: &mut Q8Row) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn fast(x: &[f32], out: &mut Q8Row) {
            quantize_row_impl(x, out)
        }
        if super::x86::vnni_available() && x.len().is_multiple_of(QK) {
            // Safety: `vnni_available` checked AVX-512F, and BW is checked here.
            if is_x86_feature_detected!("avx512bw") {
                return unsafe { super::x86::quantize_row_avx512(x, out) };
            }
        }
        if super::x86::available() {
            // Safety: the features were checked.
            return unsafe { fast(x, out) };
        }
    }
    quantize_row_impl(x, out)
}

/// [`quantize_row`] in portable code (the reference the SIMD versions are tested against).
#[cfg(test)]
pub(crate) fn quantize_row_portable(x: &[f32], out: &mut Q8Row) {
    quantize_row_impl(x, out)
}

#[inline(always)]
fn quantize_row_impl(x: &[f32], out: &mut Q8Row) {
    debug_assert_eq!(x.len() % QK, 0);
    let nb = x.len() / QK;
    out.d.clear();
    out.s.clear();
    out.qs.clear();
    out.qs.reserve(x.len());
    for block in x.chunks_exact(QK) {
        quantize_block(block, out);
    }
    debug_assert_eq!(out.d.len(), nb);
}

/// One block of [`quantize_row`], appended to `out`. (Values are rounded then converted with
/// saturation; the wrapping sum only matters for blocks of non-finite or vanishing values.)
#[inline(always)]
pub(crate) fn quantize_block(block: &[f32], out: &mut Q8Row) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for &v in block {
        let q = (v * id).round_ties_even() as i32;
        sum = sum.wrapping_add(q);
        out.qs.push(q as i8);
    }
    out.d.push(f16::from_f32(d).to_f32());
    out.s.push(f16::from_f32(d * sum as f32).to_f32());
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// llama.cpp's `hsum_float_8`: the order of the final additions matters for exactness.
#[inline(always)]
pub(crate) fn hsum8(a: [f32; 8]) -> f32 {
    let r = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Lane `l` of the products of one block: values `4l..4l+4`.
#[inline(always)]
fn lane_sums(x: &[i8], y: &[i8]) -> [f32; 8] {
    let (x, y) = (&x[..QK], &y[..QK]);
    let mut lanes = [0f32; 8];
    for (l, lane) in lanes.iter_mut().enumerate() {
        let mut s = 0i32;
        for j in 4 * l..4 * l + 4 {
            s += x[j] as i32 * y[j] as i32;
        }
        *lane = s as f32;
    }
    lanes
}

/// A weight row unpacked to one `i8` per value, with its per-block scales (and, for Q4_1,
/// minimums), so one unpacking serves every input row of a matmul.
#[derive(Debug, Clone, Default)]
pub struct UnpackedRow {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    /// Per-block minimum (Q4_1 only; empty otherwise).
    pub m: Vec<f32>,
}

/// Unpacks one GGML weight row of `kind`.
pub fn unpack_row(kind: WeightKind, w: &[u8], out: &mut UnpackedRow) {
    out.qs.clear();
    out.d.clear();
    out.m.clear();
    match kind {
        WeightKind::Q4_0 => {
            for blk in w.chunks_exact(Q4_0_BYTES) {
                out.d.push(f16_at(blk, 0));
                out.qs
                    .extend(blk[2..].iter().map(|&b| (b & 0x0F) as i8 - 8));
                out.qs.extend(blk[2..].iter().map(|&b| (b >> 4) as i8 - 8));
            }
        }
        WeightKind::Q4_1 => {
            for blk in w.chunks_exact(Q4_1_BYTES) {
                out.d.push(f16_at(blk, 0));
                out.m.push(f16_at(blk, 2));
                out.qs.extend(blk[4..].iter().map(|&b| (b & 0x0F) as i8));
                out.qs.extend(blk[4..].iter().map(|&b| (b >> 4) as i8));
            }
        }
        WeightKind::Q8_0 => {
            for blk in w.chunks_exact(Q8_0_BYTES) {
                out.d.push(f16_at(blk, 0));
                out.qs.extend(blk[2..].iter().map(|&b| b as i8));
            }
        }
    }
}

/// Dot product of an unpacked weight row with a quantized activation row, as llama.cpp's
/// `ggml_vec_dot_q4_0_q8_0`, `_q4_1_q8_1` and `_q8_0_q8_0` compute it on x86.
#[inline(always)]
pub fn dot(w: &UnpackedRow, a: &Q8Row) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let has_min = !w.m.is_empty();
    for (b, (x, y)) in w.qs.chunks_exact(QK).zip(a.qs.chunks_exact(QK)).enumerate() {
        let d = w.d[b] * a.d[b];
        if has_min {
            summs += w.m[b] * a.s[b];
        }
        let lanes = lane_sums(x, y);
        for l in 0..8 {
            acc[l] = d.mul_add(lanes[l], acc[l]);
        }
    }
    if has_min {
        hsum8(acc) + summs
    } else {
        hsum8(acc)
    }
}

/// Dequantizes one weight row into `out` (appending), as candle and llama.cpp do for
/// embedding lookups: `q * d` (`+ m` for Q4_1).
pub fn dequantize_row(kind: WeightKind, w: &[u8], out: &mut Vec<f32>) {
    match kind {
        WeightKind::Q4_0 => {
            for blk in w.chunks_exact(Q4_0_BYTES) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&b| ((b & 0x0F) as i32 - 8) as f32 * d));
                out.extend(blk[2..].iter().map(|&b| ((b >> 4) as i32 - 8) as f32 * d));
            }
        }
        WeightKind::Q4_1 => {
            for blk in w.chunks_exact(Q4_1_BYTES) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                out.extend(blk[4..].iter().map(|&b| (b & 0x0F) as f32 * d + m));
                out.extend(blk[4..].iter().map(|&b| (b >> 4) as f32 * d + m));
            }
        }
        WeightKind::Q8_0 => {
            for blk in w.chunks_exact(Q8_0_BYTES) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
    }
}
