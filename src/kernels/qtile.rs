//! Q4_1 and Q8_0 weights (the default model's types) in tiles of 16 rows, so that one 512-bit
//! load feeds sixteen rows' integer sums (one row per lane) with no per-row unpacking. Per
//! tile and 32-column block:
//! - Q4_1 (320 bytes, as large as GGML's 16 blocks): four 64-byte lines `g`, each
//!   `[row][4 bytes]` holding GGML's quant bytes `4g..4g + 4` (values `4g..` in the low
//!   nibbles, `16 + 4g..` in the high ones); then the rows' scales `d` and minimums `m` (f16).
//! - Q8_0 (544 bytes), in pairs of blocks so that nothing is padding and every block's lines
//!   stay on cache lines (1,088 bytes, 17 lines): the two blocks' eight lines `l` each, each
//!   `[row][4 bytes]` holding values `4l..4l + 4`, then both blocks' scales `d` (f16) in one
//!   line. An odd last block has a pair of its own, half unused. (One padded line a block
//!   cost 5.9% more bytes, and the output matrix is a third of what a SmolLM2 step reads.)
//!
//! The AVX-512 VNNI kernel keeps llama.cpp's arithmetic per row exactly (the parity tests
//! depend on it): eight f32 lanes per row (lane `l` sums values `4l..4l + 4` of a block), one
//! FMA per lane per block with the block's scale product, `hsum_float_8`'s order at the end,
//! then Q4_1's offset sum. So it gives the bits of [`super::x86::dot_q4_1`] /
//! [`super::x86::dot_q8_0`] and of the portable [`super::quant::dot`].

use super::aligned::AlignedBytes;
use super::quant::{Q8Row, WeightKind, QK};

/// Weight rows per tile.
pub const TILE: usize = 16;

/// Where block `b` of a tile keeps its quants, scales and (Q4_1) minimums.
#[derive(Clone, Copy)]
struct Layout {
    q8: bool,
}

/// Q4_1's block: four quant lines, then 16 scales and 16 minimums.
const Q4_1_BLOCK: usize = 320;
/// Q8_0's pair of blocks: eight quant lines each, then both blocks' 16 scales.
const Q8_0_PAIR: usize = 1088;

impl Layout {
    /// Bytes of one tile of `nb` blocks.
    fn tile_len(self, nb: usize) -> usize {
        if self.q8 {
            nb.div_ceil(2) * Q8_0_PAIR
        } else {
            nb * Q4_1_BLOCK
        }
    }

    /// Offset of block `b`'s first quant line.
    #[inline(always)]
    fn quants(self, b: usize) -> usize {
        if self.q8 {
            b / 2 * Q8_0_PAIR + b % 2 * 512
        } else {
            b * Q4_1_BLOCK
        }
    }

    /// Offset of block `b`'s 16 f16 scales.
    #[inline(always)]
    fn d(self, b: usize) -> usize {
        if self.q8 {
            b / 2 * Q8_0_PAIR + 1024 + b % 2 * 32
        } else {
            b * Q4_1_BLOCK + 256
        }
    }

    /// Offset of block `b`'s 16 f16 minimums (Q4_1).
    #[inline(always)]
    fn m(self, b: usize) -> usize {
        b * Q4_1_BLOCK + 288
    }

    /// Bytes a block spans on average (how far ahead to prefetch).
    fn stride(self) -> usize {
        if self.q8 {
            Q8_0_PAIR / 2
        } else {
            Q4_1_BLOCK
        }
    }
}

fn layout(kind: WeightKind) -> Layout {
    Layout {
        q8: kind == WeightKind::Q8_0,
    }
}

/// A Q4_1 or Q8_0 matrix `[rows, cols]` in tiles (`rows` a multiple of 16).
pub struct QTiles {
    kind: WeightKind,
    rows: usize,
    cols: usize,
    data: AlignedBytes,
}

impl QTiles {
    pub fn supports(kind: WeightKind, rows: usize, cols: usize) -> bool {
        matches!(kind, WeightKind::Q4_1 | WeightKind::Q8_0)
            && rows > 0
            && rows.is_multiple_of(TILE)
            && cols > 0
            && cols.is_multiple_of(QK)
    }

    /// Regroups GGML blocks (row-major).
    pub fn pack(kind: WeightKind, rows: usize, cols: usize, data: &[u8]) -> Self {
        assert!(Self::supports(kind, rows, cols), "unsupported tile shape");
        let (nb, bb, lay) = (cols / QK, kind.block_bytes(), layout(kind));
        assert_eq!(data.len(), rows * nb * bb, "weight data length");
        let tile_len = lay.tile_len(nb);
        let mut tiles = AlignedBytes::zeroed(rows / TILE * tile_len);
        let bytes = tiles.as_mut_slice();
        for (r, row) in data.chunks_exact(nb * bb).enumerate() {
            let (tile, lane) = (r / TILE, r % TILE);
            let dst = &mut bytes[tile * tile_len..][..tile_len];
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                dst[lay.d(b) + 2 * lane..][..2].copy_from_slice(&blk[0..2]);
                let qs = match kind {
                    WeightKind::Q8_0 => &blk[2..34],
                    _ => {
                        dst[lay.m(b) + 2 * lane..][..2].copy_from_slice(&blk[2..4]);
                        &blk[4..20]
                    }
                };
                for (g, four) in qs.chunks_exact(4).enumerate() {
                    dst[lay.quants(b) + 64 * g + 4 * lane..][..4].copy_from_slice(four);
                }
            }
        }
        Self {
            kind,
            rows,
            cols,
            data: tiles,
        }
    }

    pub fn kind(&self) -> WeightKind {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Tile `t`'s blocks.
    pub fn tile(&self, t: usize) -> &[u8] {
        let len = layout(self.kind).tile_len(self.cols / QK);
        &self.data.as_slice()[t * len..][..len]
    }

    /// Row `r` as GGML blocks, rebuilt into `buf`.
    pub fn row_into<'a>(&self, r: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        let (tile, lane, lay) = (self.tile(r / TILE), r % TILE, layout(self.kind));
        let lines = if self.kind == WeightKind::Q8_0 { 8 } else { 4 };
        buf.clear();
        for b in 0..self.cols / QK {
            buf.extend_from_slice(&tile[lay.d(b) + 2 * lane..][..2]);
            if self.kind == WeightKind::Q4_1 {
                buf.extend_from_slice(&tile[lay.m(b) + 2 * lane..][..2]);
            }
            for g in 0..lines {
                buf.extend_from_slice(&tile[lay.quants(b) + 64 * g + 4 * lane..][..4]);
            }
        }
        buf
    }
}

/// The AVX-512 VNNI kernels.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{layout, WeightKind, QK};
    use crate::kernels::kpack_x86::{bcast as bc, prefetch};
    use crate::kernels::quant::Q8Row;
    use std::arch::x86_64::*;

    /// How many blocks ahead the weights are prefetched.
    const PREFETCH_BLOCKS: usize = 4;

    /// Tile `tile` of `kind` against one or two activation rows, 16 outputs at each of `outs`;
    /// `pf`: prefetch the weights ahead (the first pass over a tile).
    ///
    /// # Safety
    /// The CPU must support AVX-512F, BW, VNNI, FMA and F16C; each `outs[i]` must be valid for
    /// 16 writes; `tile` is a whole tile for rows as wide as `acts`'.
    pub unsafe fn tile(kind: WeightKind, tile: &[u8], acts: &[Q8Row], outs: &[*mut f32], pf: bool) {
        match (kind, acts.len()) {
            (WeightKind::Q8_0, 1) => kernel::<1, true>(tile, acts, outs, pf),
            (WeightKind::Q8_0, 2) => kernel::<2, true>(tile, acts, outs, pf),
            (_, 1) => kernel::<1, false>(tile, acts, outs, pf),
            (_, 2) => kernel::<2, false>(tile, acts, outs, pf),
            _ => unreachable!("one or two activation rows"),
        }
    }

    /// `Q8`: Q8_0 weights (signed bytes, eight lines a block), else Q4_1 (nibbles, four lines,
    /// and minimums).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // `l` picks both the line and the lane accumulator
    unsafe fn kernel<const MT: usize, const Q8: bool>(
        tile: &[u8],
        acts: &[Q8Row],
        outs: &[*mut f32],
        pf: bool,
    ) {
        let lay = layout(if Q8 {
            WeightKind::Q8_0
        } else {
            WeightKind::Q4_1
        });
        let nb = acts[0].d.len();
        assert!(tile.len() >= lay.tile_len(nb) && acts.len() == MT && outs.len() == MT);
        assert!(acts
            .iter()
            .all(|a| a.qs.len() >= nb * QK && a.s.len() >= nb));
        let (m4, zero) = (_mm512_set1_epi8(0x0F), _mm512_setzero_si512());
        let mut acc = [[_mm512_setzero_ps(); 8]; MT];
        let mut summs = [_mm512_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.as_ptr().add(lay.quants(b));
            if pf {
                // Whole lines a block spans, rounded up (a Q8_0 pair's scale line included).
                prefetch(
                    blk.wrapping_add(PREFETCH_BLOCKS * lay.stride()),
                    lay.stride().div_ceil(64),
                );
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tile.as_ptr().add(lay.d(b)) as *const _));
            let d: [__m512; MT] =
                std::array::from_fn(|m| _mm512_mul_ps(dw, _mm512_set1_ps(acts[m].d[b])));
            let x: [*const i8; MT] = std::array::from_fn(|m| acts[m].qs.as_ptr().add(b * QK));
            if Q8 {
                for l in 0..8 {
                    let w = _mm512_loadu_si512(blk.add(64 * l) as *const _);
                    // Signed x signed as |w| x (a with w's sign), as llama.cpp's AVX2 code.
                    let (aw, neg) = (_mm512_abs_epi8(w), _mm512_movepi8_mask(w));
                    for m in 0..MT {
                        let a = bc(x[m].add(4 * l));
                        let a = _mm512_mask_sub_epi8(a, neg, zero, a);
                        let i = _mm512_dpbusd_epi32(zero, aw, a);
                        acc[m][l] = _mm512_fmadd_ps(d[m], _mm512_cvtepi32_ps(i), acc[m][l]);
                    }
                }
            } else {
                let mw =
                    _mm512_cvtph_ps(_mm256_loadu_si256(tile.as_ptr().add(lay.m(b)) as *const _));
                for m in 0..MT {
                    let s = _mm512_mul_ps(mw, _mm512_set1_ps(acts[m].s[b]));
                    summs[m] = _mm512_add_ps(summs[m], s);
                }
                // High nibbles stay in place (16x their value), so no shift: their sums are
                // 16x too and meet d/16. Both scalings are exact (powers of two, sums far
                // below 2^24), so each FMA gets the same real product and the same bits.
                let d16: [__m512; MT] =
                    std::array::from_fn(|m| _mm512_mul_ps(d[m], _mm512_set1_ps(0.0625)));
                for g in 0..4 {
                    let w = _mm512_loadu_si512(blk.add(64 * g) as *const _);
                    let lo = _mm512_and_si512(w, m4);
                    let hi = _mm512_andnot_si512(m4, w);
                    for m in 0..MT {
                        let il = _mm512_dpbusd_epi32(zero, lo, bc(x[m].add(4 * g)));
                        acc[m][g] = _mm512_fmadd_ps(d[m], _mm512_cvtepi32_ps(il), acc[m][g]);
                        let ih = _mm512_dpbusd_epi32(zero, hi, bc(x[m].add(16 + 4 * g)));
                        acc[m][g + 4] =
                            _mm512_fmadd_ps(d16[m], _mm512_cvtepi32_ps(ih), acc[m][g + 4]);
                    }
                }
            }
        }
        for m in 0..MT {
            let a = &acc[m];
            // hsum_float_8: ((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7)).
            let even = _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6]));
            let odd = _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]));
            let sum = _mm512_add_ps(even, odd);
            let sum = if Q8 {
                sum
            } else {
                _mm512_add_ps(sum, summs[m])
            };
            _mm512_storeu_ps(outs[m], sum);
        }
    }
}

/// True when Q4_1 and Q8_0 matrices are kept in tiles: where the tile kernel runs
/// ([`simd_available`]). With `EDGEINFER_NO_SIMD` or `EDGEINFER_NO_AVX512` set the rows stay
/// as GGML lays them out, as on a CPU without AVX-512 VNNI, so a run under either switch
/// measures such a CPU (before, every product rebuilt its rows from the tiles: the default
/// model decoded at 0.38-0.46x llama.cpp's AVX2 build under `EDGEINFER_NO_AVX512`, against
/// 0.64-0.73x with the rows kept).
pub fn tiled_here() -> bool {
    simd_available()
}

/// True when the tile kernel runs here (AVX-512 VNNI; neither `EDGEINFER_NO_SIMD` nor
/// `EDGEINFER_NO_AVX512` set).
pub fn simd_available() -> bool {
    super::kpack::simd_available()
}

/// One tile against one or two activation rows (see [`x86::tile`]); `false` when the kernel
/// does not run on this CPU (where no matrix is kept in tiles: [`tiled_here`]).
pub fn run_tile(tiles: &QTiles, t: usize, acts: &[Q8Row], outs: &[*mut f32], pf: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // Safety: `simd_available` checked the features; the caller owns `outs`.
        unsafe { x86::tile(tiles.kind, tiles.tile(t), acts, outs, pf) };
        return true;
    }
    let _ = (tiles, t, acts, outs, pf);
    false
}
