//! Q4_1 weights (the default model's type) in tiles of 16 rows, so that one 512-bit load feeds
//! sixteen rows' integer sums (one row per lane) with no per-row unpacking. A tile block is
//! exactly as large as GGML's 16 blocks (320 bytes for 16 rows x 32 values):
//! - four 64-byte lines `g`, each `[row][4 bytes]` holding GGML's quant bytes `4g..4g + 4`
//!   (values `4g..4g + 4` in the low nibbles, `16 + 4g..` in the high ones);
//! - the 16 rows' scales `d`, then their minimums `m`, as f16.
//!
//! The AVX-512 VNNI kernel keeps llama.cpp's arithmetic per row exactly (the parity tests
//! depend on it): eight f32 lanes per row, one FMA per lane per block with the block's scale
//! product, `hsum_float_8`'s order at the end, then the offset sum. So it gives the bits of
//! [`super::x86::dot_q4_1`] and of the portable [`super::quant::dot`].

use super::quant::{Q8Row, Q4_1_BYTES, QK};

/// Weight rows per tile.
pub const TILE: usize = 16;
/// Bytes of one tile block (16 rows x 32 values).
const BLOCK: usize = 320;
const D: usize = 256;
const M: usize = 288;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A Q4_1 matrix `[rows, cols]` in tiles (`rows` a multiple of 16).
pub struct Q41Tiles {
    rows: usize,
    cols: usize,
    lines: Vec<Line>,
}

impl Q41Tiles {
    pub fn supports(rows: usize, cols: usize) -> bool {
        rows > 0 && rows.is_multiple_of(TILE) && cols > 0 && cols.is_multiple_of(QK)
    }

    /// Regroups GGML Q4_1 blocks (row-major).
    pub fn pack(rows: usize, cols: usize, data: &[u8]) -> Self {
        assert!(Self::supports(rows, cols), "unsupported Q4_1 tile shape");
        let nb = cols / QK;
        assert_eq!(data.len(), rows * nb * Q4_1_BYTES, "Q4_1 data length");
        let mut lines = vec![Line([0; 64]); rows / TILE * nb * BLOCK / 64];
        // Safety: `Line` is 64 plain bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64)
        };
        for (r, row) in data.chunks_exact(nb * Q4_1_BYTES).enumerate() {
            let (tile, lane) = (r / TILE, r % TILE);
            for (b, blk) in row.chunks_exact(Q4_1_BYTES).enumerate() {
                let dst = &mut bytes[(tile * nb + b) * BLOCK..][..BLOCK];
                for g in 0..4 {
                    dst[64 * g + 4 * lane..][..4].copy_from_slice(&blk[4 + 4 * g..][..4]);
                }
                dst[D + 2 * lane..][..2].copy_from_slice(&blk[0..2]);
                dst[M + 2 * lane..][..2].copy_from_slice(&blk[2..4]);
            }
        }
        Self { rows, cols, lines }
    }

    fn bytes(&self) -> &[u8] {
        // Safety: `Line` is 64 plain bytes.
        unsafe {
            std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.lines.len() * 64)
        }
    }

    fn blocks(&self) -> usize {
        self.cols / QK
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tile `t`'s blocks.
    pub fn tile(&self, t: usize) -> &[u8] {
        let len = self.blocks() * BLOCK;
        &self.bytes()[t * len..][..len]
    }

    /// Row `r` as GGML blocks, rebuilt into `buf`.
    pub fn row_into<'a>(&self, r: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        let (tile, lane) = (self.tile(r / TILE), r % TILE);
        buf.clear();
        for src in tile.chunks_exact(BLOCK) {
            buf.extend_from_slice(&src[D + 2 * lane..][..2]);
            buf.extend_from_slice(&src[M + 2 * lane..][..2]);
            for g in 0..4 {
                buf.extend_from_slice(&src[64 * g + 4 * lane..][..4]);
            }
        }
        buf
    }
}

/// The AVX-512 VNNI kernel.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{BLOCK, D, M, QK};
    use crate::kernels::quant::Q8Row;
    use std::arch::x86_64::*;

    /// How many blocks ahead the weights are prefetched.
    const PREFETCH_BLOCKS: usize = 4;

    /// Tile `tile` against one or two activation rows, 16 outputs at each of `outs`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, BW, VNNI, FMA and F16C; each `outs[i]` must be valid for
    /// 16 writes; `tile` is a whole tile for rows as wide as `acts`'.
    pub unsafe fn tile(tile: &[u8], acts: &[Q8Row], outs: &[*mut f32]) {
        match acts.len() {
            1 => kernel::<1>(tile, acts, outs),
            2 => kernel::<2>(tile, acts, outs),
            _ => unreachable!("one or two activation rows"),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    unsafe fn kernel<const MT: usize>(tile: &[u8], acts: &[Q8Row], outs: &[*mut f32]) {
        let nb = acts[0].d.len();
        assert!(tile.len() >= nb * BLOCK && acts.len() == MT && outs.len() == MT);
        assert!(acts
            .iter()
            .all(|a| a.qs.len() >= nb * QK && a.s.len() >= nb));
        let m4 = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); 8]; MT];
        let mut summs = [_mm512_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.as_ptr().add(b * BLOCK);
            for i in 0..BLOCK / 64 {
                let ahead = blk.wrapping_add(PREFETCH_BLOCKS * BLOCK + 64 * i);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(D) as *const _));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(M) as *const _));
            let d: [__m512; MT] =
                std::array::from_fn(|m| _mm512_mul_ps(dw, _mm512_set1_ps(acts[m].d[b])));
            for m in 0..MT {
                let s = _mm512_mul_ps(mw, _mm512_set1_ps(acts[m].s[b]));
                summs[m] = _mm512_add_ps(summs[m], s);
            }
            for g in 0..4 {
                let w = _mm512_loadu_si512(blk.add(64 * g) as *const _);
                let lo = _mm512_and_si512(w, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                for m in 0..MT {
                    let x = acts[m].qs.as_ptr().add(b * QK);
                    let bc = |o: usize| {
                        _mm512_set1_epi32(std::ptr::read_unaligned(x.add(o) as *const i32))
                    };
                    let il = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, bc(4 * g));
                    acc[m][g] = _mm512_fmadd_ps(d[m], _mm512_cvtepi32_ps(il), acc[m][g]);
                    let ih = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, bc(16 + 4 * g));
                    acc[m][g + 4] = _mm512_fmadd_ps(d[m], _mm512_cvtepi32_ps(ih), acc[m][g + 4]);
                }
            }
        }
        for m in 0..MT {
            let a = &acc[m];
            // hsum_float_8: ((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7)).
            let even = _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6]));
            let odd = _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]));
            _mm512_storeu_ps(outs[m], _mm512_add_ps(_mm512_add_ps(even, odd), summs[m]));
        }
    }
}

/// True when this CPU has the tile kernel's instructions (whatever the environment says): the
/// layout is chosen by hardware, so `EDGEINFER_NO_SIMD` / `EDGEINFER_NO_AVX512` rebuild rows
/// for the other kernels and give the same results.
pub fn hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::x86::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the tile kernel runs here (AVX-512 VNNI; neither `EDGEINFER_NO_SIMD` nor
/// `EDGEINFER_NO_AVX512` set).
pub fn simd_available() -> bool {
    super::kpack::simd_available()
}

/// One tile against one or two activation rows (see [`x86::tile`]); `false` when the kernel
/// does not run on this CPU (the caller then rebuilds rows).
pub fn run_tile(tiles: &Q41Tiles, t: usize, acts: &[Q8Row], outs: &[*mut f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // Safety: `simd_available` checked the features; the caller owns `outs`.
        unsafe { x86::tile(tiles.tile(t), acts, outs) };
        return true;
    }
    let _ = (tiles, t, acts, outs);
    false
}
