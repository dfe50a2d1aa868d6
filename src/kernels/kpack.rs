//! Q4_K and Q6_K weights repacked at load into tiles of 16 weight rows, so that one 512-bit
//! load feeds sixteen rows' integer dot products (one output row per vector lane) with no
//! per-row unpacking, no horizontal sums and no wider copy of the weights: a tile is as
//! compact as GGML's blocks (Q4_K 2368 bytes per 16 x 256 values against 2304, Q6_K 3392
//! against 3360).
//!
//! Per tile and super-block (256 columns), GGML's bytes are regrouped:
//! - values in groups of 8 columns `g`, each group as `[row][4 bytes]`, byte `j` holding
//!   columns `8g + j` (low nibble) and `8g + j + 4` (high nibble), so a 64-byte load is 16 rows
//!   of 8 values and an activation broadcast of 4 bytes meets one nibble half;
//! - Q6_K's top two bits in a second plane, one 64-byte line per 16 columns;
//! - 6-bit scales and mins as bytes `[sub-block][row]`, float scales as `[row]` f16.
//!
//! Each output is `sum_sb (d * da) * T - (dmin * da) * M` with exact integer sums `T` (the
//! sub-block sums times their scales) and `M` (mins times activation sums): one FMA each per
//! super-block, in the same order in every variant, so the AVX-512 VNNI and AVX2 kernels
//! ([`super::kpack_x86`]) give the portable code's bits.

use rayon::prelude::*;

use super::aligned::AlignedBytes;
use super::kquant::{self, KKind, KRow, Q8KRow, QK_K};
use super::quant::f16_at as f16;

/// Weight rows per tile (one per 32-bit lane of a 512-bit vector).
pub const TILE: usize = 16;

/// Byte offsets inside one Q4_K tile super-block.
pub(crate) mod q4k {
    pub const QS: usize = 0;
    pub const SC: usize = 2048;
    pub const MN: usize = 2176;
    pub const D: usize = 2304;
    pub const DMIN: usize = 2336;
    pub const BYTES: usize = 2368;
}

/// Byte offsets inside one Q6_K tile super-block (32 bytes of padding keep tiles on 64-byte
/// lines).
pub(crate) mod q6k {
    pub const QL: usize = 0;
    pub const QH: usize = 2048;
    pub const SC: usize = 3072;
    pub const D: usize = 3328;
    pub const BYTES: usize = 3392;
}

/// A Q4_K or Q6_K matrix `[rows, cols]` in tiles: `rows` a multiple of [`TILE`], `cols` of 256.
pub struct KPacked {
    pub rows: usize,
    pub cols: usize,
    pub kind: KKind,
    data: AlignedBytes,
}

/// Tiles handed to one parallel task: at least this many weight bytes.
const TASK_BYTES: usize = 48 * 1024;

impl KPacked {
    /// True when this shape and type can be packed.
    pub fn supports(kind: KKind, rows: usize, cols: usize) -> bool {
        matches!(kind, KKind::Q4K | KKind::Q6K)
            && rows > 0
            && rows.is_multiple_of(TILE)
            && cols > 0
            && cols.is_multiple_of(QK_K)
    }

    fn sb_bytes(kind: KKind) -> usize {
        match kind {
            KKind::Q6K => q6k::BYTES,
            _ => q4k::BYTES,
        }
    }

    /// Repacks GGML blocks `data` (row-major, `rows * cols / 256` blocks), in parallel.
    pub fn pack(kind: KKind, rows: usize, cols: usize, data: &[u8]) -> Self {
        assert!(
            Self::supports(kind, rows, cols),
            "unsupported K-quant shape"
        );
        let kb = cols / QK_K;
        let row_bytes = kb * kind.block_bytes();
        assert_eq!(data.len(), rows * row_bytes, "K-quant data length");
        let tile_bytes = kb * Self::sb_bytes(kind);
        let mut tiles = AlignedBytes::zeroed(rows / TILE * tile_bytes);
        tiles
            .as_mut_slice()
            .par_chunks_mut(tile_bytes)
            .enumerate()
            .for_each_init(KRow::default, |w, (t, tile)| {
                for r in 0..TILE {
                    let row = t * TILE + r;
                    let src = &data[row * row_bytes..][..row_bytes];
                    #[cfg(target_arch = "x86_64")]
                    if super::cpu::simd_available() {
                        // Safety: `simd_available` checked AVX2, FMA and F16C; the same bytes.
                        unsafe { super::kquant_x86::unpack_row(kind, src, w) };
                    } else {
                        kquant::unpack_row(kind, src, w);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    kquant::unpack_row(kind, src, w);
                    for (sb, blk) in tile.chunks_exact_mut(Self::sb_bytes(kind)).enumerate() {
                        write_row(kind, w, sb, r, blk);
                    }
                }
            });
        Self {
            rows,
            cols,
            kind,
            data: tiles,
        }
    }

    pub(crate) fn tile_bytes(&self) -> usize {
        self.cols / QK_K * Self::sb_bytes(self.kind)
    }

    /// Tile `t`'s bytes (all its super-blocks).
    pub(crate) fn tile(&self, t: usize) -> &[u8] {
        &self.data.as_slice()[t * self.tile_bytes()..][..self.tile_bytes()]
    }

    /// Row `r` dequantized (appended to `out`), with candle's arithmetic (the values of
    /// [`kquant::dequantize_row`] on the original blocks).
    pub fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        assert!(r < self.rows, "row out of range");
        let (tile, lane) = (self.tile(r / TILE), r % TILE);
        for blk in tile.chunks_exact(Self::sb_bytes(self.kind)) {
            match self.kind {
                KKind::Q6K => {
                    let d = f16(blk, q6k::D + 2 * lane);
                    for v in 0..QK_K {
                        let sc = blk[q6k::SC + 16 * (v / 16) + lane] as i8 as f32;
                        out.push(d * sc * (q6k_value(blk, lane, v) as i32 - 32) as f32);
                    }
                }
                _ => {
                    let (d, dmin) = (f16(blk, q4k::D + 2 * lane), f16(blk, q4k::DMIN + 2 * lane));
                    for v in 0..QK_K {
                        let s = v / 32;
                        let d1 = d * blk[q4k::SC + 16 * s + lane] as f32;
                        let m1 = dmin * blk[q4k::MN + 32 * (s / 2) + 2 * lane + s % 2] as f32;
                        out.push(d1 * nibble(blk, q4k::QS, lane, v) as f32 - m1);
                    }
                }
            }
        }
    }

    /// The product with activation rows in Q8_K form. Returns `[n, rows]`.
    pub fn matmul_q8k(&self, acts: &[Q8KRow]) -> Vec<f32> {
        Self::matmul_many(&[self], acts).pop().expect("one product")
    }

    /// The products of several matrices with the same activations (q, k, v; gate, up) in one
    /// parallel loop over all their tiles. Returns one `[n, rows]` per matrix.
    pub fn matmul_many(ms: &[&KPacked], acts: &[Q8KRow]) -> Vec<Vec<f32>> {
        let n = acts.len();
        for m in ms {
            assert!(
                acts.iter().all(|a| a.qs.len() == m.cols),
                "activation width"
            );
        }
        let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; n * m.rows]).collect();
        let dsts: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
        // (matrix, tile) pairs, matrix by matrix.
        let units: Vec<(usize, usize)> = ms
            .iter()
            .enumerate()
            .flat_map(|(i, m)| (0..m.rows / TILE).map(move |t| (i, t)))
            .collect();
        let min_tiles = ms
            .iter()
            .map(|m| (TASK_BYTES / m.tile_bytes()).max(1))
            .min()
            .unwrap_or(1);
        let kernel = Kernel::choose();
        super::pool::for_ranges_guided(units.len(), min_tiles, |range| {
            for &(i, t) in &units[range] {
                let (m, dst) = (ms[i], &dsts[i]);
                let rows = kernel.rows_per_pass();
                for (g, group) in acts.chunks(rows).enumerate() {
                    // Safety: each (matrix, tile, input row) writes its own 16 outputs.
                    let outs: [*mut f32; 8] = std::array::from_fn(|j| unsafe {
                        dst.0
                            .add((rows * g + j.min(group.len() - 1)) * m.rows + t * TILE)
                    });
                    kernel.run(m, t, group, &outs[..group.len()], g == 0);
                }
            }
        });
        outs
    }
}

struct SendPtr(*mut f32);
// Safety: tasks write disjoint ranges (see `matmul_q8k`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// Activation rows per pass over a tile.
    fn rows_per_pass(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => super::kpack_x86::MAX_ROWS,
            _ => 4,
        }
    }

    fn choose() -> Self {
        #[cfg(target_arch = "x86_64")]
        if simd_available() {
            return Self::Avx512;
        } else if super::cpu::simd_available() {
            return Self::Avx2;
        }
        Self::Portable
    }

    fn run(self, m: &KPacked, t: usize, acts: &[Q8KRow], outs: &[*mut f32], pf: bool) {
        match self {
            Self::Portable => {
                let _ = pf;
                let mut acc = [0f32; TILE];
                for (a, &o) in acts.iter().zip(outs) {
                    tile_portable(m.kind, m.tile(t), a, &mut acc);
                    // Safety: `o` points at 16 outputs of this task's own.
                    unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), o, TILE) };
                }
            }
            #[cfg(target_arch = "x86_64")]
            // Safety: `simd_available` checked the CPU features.
            Self::Avx512 => unsafe { super::kpack_x86::tile(m.kind, m.tile(t), acts, outs, pf) },
            #[cfg(target_arch = "x86_64")]
            // Safety: `cpu::simd_available` checked the CPU features.
            Self::Avx2 => unsafe { super::kpack_x86::tile_avx2(m.kind, m.tile(t), acts, outs, pf) },
        }
    }
}

/// True when the AVX-512 VNNI kernel runs (and neither `EDGEINFER_NO_SIMD` nor
/// `EDGEINFER_NO_AVX512` is set).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::x86::vnni_available()
            && is_x86_feature_detected!("avx512bw")
            && super::cpu::simd_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Column `v`'s 4-bit value in a nibble plane at `base` (see the module docs).
fn nibble(blk: &[u8], base: usize, lane: usize, v: usize) -> u8 {
    let (g, j) = (v / 8, v % 8);
    let byte = blk[base + (g * TILE + lane) * 4 + j % 4];
    if j < 4 {
        byte & 0xF
    } else {
        byte >> 4
    }
}

/// Column `v`'s 6-bit Q6_K value.
fn q6k_value(blk: &[u8], lane: usize, v: usize) -> u8 {
    let (p, w) = (v / 16, v % 16);
    let h = blk[q6k::QH + (p * TILE + lane) * 4 + w % 4];
    nibble(blk, q6k::QL, lane, v) | ((h >> (2 * (w / 4))) & 3) << 4
}

/// Writes unpacked row `w`'s super-block `sb` into lane `lane` of a tile super-block.
fn write_row(kind: KKind, w: &KRow, sb: usize, lane: usize, blk: &mut [u8]) {
    let q = &w.q[sb * QK_K..][..QK_K];
    let put_nibbles = |blk: &mut [u8], base: usize| {
        for g in 0..QK_K / 8 {
            for j in 0..4 {
                blk[base + (g * TILE + lane) * 4 + j] =
                    (q[8 * g + j] & 0xF) | (q[8 * g + j + 4] & 0xF) << 4;
            }
        }
    };
    let put_f16 = |blk: &mut [u8], at: usize, v: f32| {
        blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
    };
    match kind {
        KKind::Q6K => {
            put_nibbles(blk, q6k::QL);
            for p in 0..QK_K / 16 {
                for j in 0..4 {
                    let h = |c: usize| (q[16 * p + c] >> 4) & 3;
                    blk[q6k::QH + (p * TILE + lane) * 4 + j] =
                        h(j) | h(j + 4) << 2 | h(j + 8) << 4 | h(j + 12) << 6;
                }
                blk[q6k::SC + 16 * p + lane] = w.sc[sb * 16 + p] as i8 as u8;
            }
            put_f16(blk, q6k::D + 2 * lane, w.d[sb]);
        }
        _ => {
            put_nibbles(blk, q4k::QS);
            for s in 0..8 {
                blk[q4k::SC + 16 * s + lane] = w.sc[sb * 16 + 2 * s] as u8;
                blk[q4k::MN + 32 * (s / 2) + 2 * lane + s % 2] = w.mn[sb * 16 + 2 * s] as u8;
            }
            put_f16(blk, q4k::D + 2 * lane, w.d[sb]);
            put_f16(blk, q4k::DMIN + 2 * lane, w.dmin[sb]);
        }
    }
}

/// Sixteen rows of one tile against one activation row (portable code): `acc[r]` is output
/// `r`.
pub(crate) fn tile_portable(kind: KKind, tile: &[u8], a: &Q8KRow, acc: &mut [f32; TILE]) {
    *acc = [0.0; TILE];
    for (sb, blk) in tile.chunks_exact(KPacked::sb_bytes(kind)).enumerate() {
        let (x, bs, da) = (
            &a.qs[sb * QK_K..][..QK_K],
            &a.bsums[sb * 16..][..16],
            a.d[sb],
        );
        for (lane, acc) in acc.iter_mut().enumerate() {
            match kind {
                KKind::Q6K => {
                    let mut total = 0i32;
                    for p in 0..16 {
                        let s: i32 = (0..16)
                            .map(|w| q6k_value(blk, lane, 16 * p + w) as i32 * x[16 * p + w] as i32)
                            .sum();
                        let sc = blk[q6k::SC + 16 * p + lane] as i8 as i32;
                        total += sc * (s - 32 * bs[p] as i32);
                    }
                    let d = f16(blk, q6k::D + 2 * lane);
                    *acc = (d * da).mul_add(total as f32, *acc);
                }
                _ => {
                    let (mut total, mut msum) = (0i32, 0i32);
                    for s in 0..8 {
                        let i: i32 = (0..32)
                            .map(|w| {
                                let v = 32 * s + w;
                                nibble(blk, q4k::QS, lane, v) as i32 * x[v] as i32
                            })
                            .sum();
                        total += blk[q4k::SC + 16 * s + lane] as i32 * i;
                        let mn = blk[q4k::MN + 32 * (s / 2) + 2 * lane + s % 2] as i32;
                        msum += mn * (bs[2 * s] as i32 + bs[2 * s + 1] as i32);
                    }
                    let (d, dmin) = (f16(blk, q4k::D + 2 * lane), f16(blk, q4k::DMIN + 2 * lane));
                    *acc = (d * da).mul_add(total as f32, *acc);
                    *acc = (-(dmin * da)).mul_add(msum as f32, *acc);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "kpack_tests.rs"]
mod tests;
