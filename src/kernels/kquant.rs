//! K-quant weights (GGML's Q4_K, Q5_K, Q6_K: super-blocks of 256 values with 6- or 8-bit
//! sub-block scales) against activations quantized once per call to Q8_K (256 values, an f32
//! scale, sums of every 16 values).
//!
//! Each weight row is unpacked once into one unsigned byte per value plus sixteen scales and
//! sixteen offsets per super-block ([`KRow`]), in L1, and applied to every input row. The three
//! formats then share one dot product:
//!
//! `sum_sb d * da * sum_g sc[g] * (q[g] . a[g])  -  dmin * da * sum_g mn[g] * bsum[g]`
//!
//! over 16-value groups `g` (Q6_K's `-32` offset becomes `mn = 32 * sc`, `dmin = d`). The
//! integer sums are exact and the float steps follow one fixed lane layout ([`dot`]), so the
//! AVX2 and AVX-512 kernels ([`super::kquant_x86`]) give the same bits as the portable code.

use super::quant::{f16_at, hsum8};

pub const QK_K: usize = 256;
const GROUPS: usize = QK_K / 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KKind {
    Q4K,
    Q5K,
    Q6K,
}

impl KKind {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }
}

/// One row of activations in Q8_K form (llama.cpp's `quantize_row_q8_K`).
#[derive(Debug, Clone, Default)]
pub struct Q8KRow {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    /// Per 16 values: the sum of their `qs`.
    pub bsums: Vec<i16>,
}

/// Quantizes `x` (a multiple of 256 long): per super-block the scale is `max / -127` of the
/// value with the largest magnitude, values round half to even. AVX2 where the CPU has it
/// (the same bytes as [`quantize_row_q8k_portable`]).
pub fn quantize_row_q8k(x: &[f32], out: &mut Q8KRow) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::simd_available() {
        // Safety: `simd_available` checked the CPU features.
        unsafe { super::kquant_x86::quantize_row_q8k(x, out) };
        return;
    }
    quantize_row_q8k_portable(x, out)
}

/// [`quantize_row_q8k`] in portable code.
pub fn quantize_row_q8k_portable(x: &[f32], out: &mut Q8KRow) {
    out.d.clear();
    out.qs.clear();
    out.bsums.clear();
    for block in x.chunks_exact(QK_K) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            out.d.push(0.0);
            out.qs.extend(std::iter::repeat_n(0, QK_K));
            out.bsums.extend(std::iter::repeat_n(0, GROUPS));
            continue;
        }
        let iscale = -127.0 / max;
        let start = out.qs.len();
        out.qs.extend(
            block
                .iter()
                .map(|&v| ((iscale * v).round_ties_even() as i32).min(127) as i8),
        );
        out.bsums.extend(
            out.qs[start..]
                .chunks_exact(16)
                .map(|g| g.iter().map(|&q| q as i16).sum::<i16>()),
        );
        out.d.push(1.0 / iscale);
    }
}

/// A weight row unpacked: per super-block `QK_K` unsigned values, sixteen group scales and
/// offsets, and the two float scales.
#[derive(Debug, Clone, Default)]
pub struct KRow {
    pub q: Vec<u8>,
    pub sc: Vec<i16>,
    pub mn: Vec<i16>,
    pub d: Vec<f32>,
    pub dmin: Vec<f32>,
}

/// The eight (scale, min) pairs of a Q4_K / Q5_K super-block, 6 bits each.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Writes super-block `sb`'s scales, offsets and float scales (from block bytes `blk`).
#[inline(always)]
pub(crate) fn write_scales(kind: KKind, blk: &[u8], sb: usize, out: &mut KRow) {
    let (sc, mn) = (
        &mut out.sc[sb * GROUPS..(sb + 1) * GROUPS],
        &mut out.mn[sb * GROUPS..(sb + 1) * GROUPS],
    );
    match kind {
        KKind::Q4K | KKind::Q5K => {
            out.d[sb] = f16_at(blk, 0);
            out.dmin[sb] = f16_at(blk, 2);
            for g in 0..GROUPS {
                let (s, m) = scale_min_k4(g / 2, &blk[4..16]);
                sc[g] = s as i16;
                mn[g] = m as i16;
            }
        }
        KKind::Q6K => {
            let d = f16_at(blk, 208);
            out.d[sb] = d;
            out.dmin[sb] = d;
            for g in 0..GROUPS {
                sc[g] = blk[192 + g] as i8 as i16;
                mn[g] = 32 * sc[g];
            }
        }
    }
}

/// Unpacks one weight row (portable code).
pub fn unpack_row(kind: KKind, w: &[u8], out: &mut KRow) {
    out.resize(w.len() / kind.block_bytes());
    for (sb, blk) in w.chunks_exact(kind.block_bytes()).enumerate() {
        write_scales(kind, blk, sb, out);
        let q = &mut out.q[sb * QK_K..(sb + 1) * QK_K];
        let mut put = {
            let mut i = 0;
            move |v: u8| {
                q[i] = v;
                i += 1;
            }
        };
        match kind {
            KKind::Q4K => {
                for qs in blk[16..144].chunks_exact(32) {
                    qs.iter().for_each(|&b| put(b & 0xF));
                    qs.iter().for_each(|&b| put(b >> 4));
                }
            }
            KKind::Q5K => {
                let qh = &blk[16..48];
                for (j, qs) in blk[48..176].chunks_exact(32).enumerate() {
                    let (lo, hi) = (1u8 << (2 * j), 2u8 << (2 * j));
                    let bit = |h: u8, m: u8| if h & m != 0 { 16 } else { 0 };
                    qs.iter()
                        .zip(qh)
                        .for_each(|(&b, &h)| put((b & 0xF) + bit(h, lo)));
                    qs.iter()
                        .zip(qh)
                        .for_each(|(&b, &h)| put((b >> 4) + bit(h, hi)));
                }
            }
            KKind::Q6K => {
                for half in 0..2 {
                    let ql = &blk[64 * half..64 * half + 64];
                    let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
                    let (ql0, ql1) = ql.split_at(32);
                    let hi = |h: u8, s: u32| ((h >> s) & 3) << 4;
                    ql0.iter()
                        .zip(qh)
                        .for_each(|(&l, &h)| put((l & 0xF) | hi(h, 0)));
                    ql1.iter()
                        .zip(qh)
                        .for_each(|(&l, &h)| put((l & 0xF) | hi(h, 2)));
                    ql0.iter()
                        .zip(qh)
                        .for_each(|(&l, &h)| put((l >> 4) | hi(h, 4)));
                    ql1.iter()
                        .zip(qh)
                        .for_each(|(&l, &h)| put((l >> 4) | hi(h, 6)));
                }
            }
        }
    }
}

impl KRow {
    /// Sizes the row for `nb` super-blocks (a no-op when it already is: rows are overwritten).
    pub(crate) fn resize(&mut self, nb: usize) {
        self.q.resize(nb * QK_K, 0);
        self.sc.resize(nb * GROUPS, 0);
        self.mn.resize(nb * GROUPS, 0);
        self.d.resize(nb, 0.0);
        self.dmin.resize(nb, 0.0);
    }
}

/// Dot product of an unpacked weight row with a Q8_K row (portable code), in the SIMD
/// kernels' lane layout so that they give the same bits: sixteen f32 lanes gather
/// `d * da * (integer sum)` over the values `v` with `(v % 64) / 4` equal to the lane (one
/// FMA per lane per super-block), eight more `-(dmin * da) * (mn . bsum)` over groups
/// `2m, 2m + 1`; the lanes are summed once at the end ([`finish`]).
pub fn dot(w: &KRow, a: &Q8KRow) -> f32 {
    let (mut acc, mut acc_m) = ([0f32; 16], [0f32; 8]);
    for (sb, &da) in a.d.iter().enumerate() {
        let (q, x) = (&w.q[sb * QK_K..][..QK_K], &a.qs[sb * QK_K..][..QK_K]);
        let sc = &w.sc[sb * GROUPS..][..GROUPS];
        let mut lanes = [0i32; 16];
        for v in 0..QK_K {
            lanes[(v % 64) / 4] += sc[v / 16] as i32 * (q[v] as i32 * x[v] as i32);
        }
        let (mn, bs) = (
            &w.mn[sb * GROUPS..][..GROUPS],
            &a.bsums[sb * GROUPS..][..GROUPS],
        );
        let (fd, fm) = (w.d[sb] * da, -(w.dmin[sb] * da));
        for (l, &s) in lanes.iter().enumerate() {
            acc[l] = fd.mul_add(s as f32, acc[l]);
        }
        for (m, lane) in acc_m.iter_mut().enumerate() {
            let s =
                mn[2 * m] as i32 * bs[2 * m] as i32 + mn[2 * m + 1] as i32 * bs[2 * m + 1] as i32;
            *lane = fm.mul_add(s as f32, *lane);
        }
    }
    finish(acc, acc_m)
}

/// The final lane sums, in llama.cpp's `hsum_float_8` order.
fn finish(acc: [f32; 16], acc_m: [f32; 8]) -> f32 {
    hsum8(std::array::from_fn(|i| acc[i] + acc[i + 8])) + hsum8(acc_m)
}

/// Dequantizes one weight row into `out` (appending), with candle's arithmetic (embedding
/// lookups give the same values as its `dequantize`).
pub fn dequantize_row(kind: KKind, w: &[u8], out: &mut Vec<f32>) {
    let mut row = KRow::default();
    for blk in w.chunks_exact(kind.block_bytes()) {
        unpack_row(kind, blk, &mut row);
        let (d, dmin) = (row.d[0], row.dmin[0]);
        for g in 0..GROUPS {
            let q = &row.q[16 * g..16 * g + 16];
            match kind {
                KKind::Q4K | KKind::Q5K => {
                    let (d1, m1) = (d * row.sc[g] as f32, dmin * row.mn[g] as f32);
                    out.extend(q.iter().map(|&q| d1 * q as f32 - m1));
                }
                KKind::Q6K => {
                    let sc = row.sc[g] as f32;
                    out.extend(q.iter().map(|&q| d * sc * (q as i32 - 32) as f32));
                }
            }
        }
    }
}

/// A K-quant weight matrix `[rows, cols]`, `cols` a multiple of 256.
pub struct KMatrix {
    pub rows: usize,
    pub cols: usize,
    pub kind: KKind,
    pub(crate) data: Vec<u8>,
}

const ROWS_PER_TASK: usize = 8;

impl KMatrix {
    pub fn row(&self, r: usize) -> &[u8] {
        let bytes = self.cols / QK_K * self.kind.block_bytes();
        &self.data[r * bytes..(r + 1) * bytes]
    }

    /// `x`: `[n, cols]` row-major. Returns `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * self.cols);
        self.matmul_q8k(&super::cpu::map_rows(x, n, quantize_row_q8k))
    }

    /// The product with activation rows already in Q8_K form. Returns `[n, rows]`.
    pub fn matmul_q8k(&self, acts: &[Q8KRow]) -> Vec<f32> {
        let n = acts.len();
        assert!(acts.iter().all(|a| a.qs.len() == self.cols));
        let simd = super::cpu::simd_available();
        let mut by_row = vec![0f32; self.rows * n];
        super::pool::for_chunks_mut(&mut by_row, ROWS_PER_TASK * n, |task, out| {
            let first = task * ROWS_PER_TASK;
            #[cfg(target_arch = "x86_64")]
            if simd {
                // Safety: `simd_available` checked the CPU features.
                unsafe { super::kquant_x86::rows(self, first, out, acts) };
                return;
            }
            let _ = simd;
            rows_portable(self, first, out, acts)
        });
        super::cpu::transpose_rows(by_row, self.rows, n)
    }
}

/// `out` (`[rows_in_task, n]`) for the weight rows from `first` (portable code).
pub(crate) fn rows_portable(m: &KMatrix, first: usize, out: &mut [f32], acts: &[Q8KRow]) {
    let mut w = KRow::default();
    for (local, out_row) in out.chunks_exact_mut(acts.len()).enumerate() {
        unpack_row(m.kind, m.row(first + local), &mut w);
        for (o, a) in out_row.iter_mut().zip(acts) {
            *o = dot(&w, a);
        }
    }
}

#[cfg(test)]
#[path = "kquant_tests.rs"]
mod tests;
