//! The AVX-512 VNNI kernel for [`super::kpack`]'s tiles: sixteen weight rows in the 32-bit
//! lanes of one vector, up to four activation rows per pass over the weights. Bit-identical
//! to [`super::kpack::tile_portable`] (exact integer sums, then the same two FMAs per
//! super-block per lane).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::kpack::{q4k, q6k, TILE};
use super::kquant::{KKind, Q8KRow, QK_K};

/// Tile `tile` against `acts` (one to four rows), writing 16 outputs at each of `outs`;
/// `pf`: prefetch the weights ahead (the first pass over a tile; later passes find them in
/// cache).
///
/// # Safety
/// The CPU must support AVX-512F, BW and VNNI; each `outs[i]` must be valid for 16 writes;
/// `tile` is a whole tile of `kind` for rows as wide as `acts`'.
pub unsafe fn tile(kind: KKind, tile: &[u8], acts: &[Q8KRow], outs: &[*mut f32], pf: bool) {
    match (kind, acts.len()) {
        (KKind::Q6K, 1) => q6k_tile::<1>(tile, acts, outs, pf),
        (KKind::Q6K, 2) => q6k_tile::<2>(tile, acts, outs, pf),
        (KKind::Q6K, 3) => q6k_tile::<3>(tile, acts, outs, pf),
        (KKind::Q6K, 4) => q6k_tile::<4>(tile, acts, outs, pf),
        (KKind::Q6K, 5) => q6k_tile::<5>(tile, acts, outs, pf),
        (KKind::Q6K, 6) => q6k_tile::<6>(tile, acts, outs, pf),
        (KKind::Q6K, 7) => q6k_tile::<7>(tile, acts, outs, pf),
        (KKind::Q6K, 8) => q6k_tile::<8>(tile, acts, outs, pf),
        (_, 1) => q4k_tile::<1>(tile, acts, outs, pf),
        (_, 2) => q4k_tile::<2>(tile, acts, outs, pf),
        (_, 3) => q4k_tile::<3>(tile, acts, outs, pf),
        (_, 4) => q4k_tile::<4>(tile, acts, outs, pf),
        (_, 5) => q4k_tile::<5>(tile, acts, outs, pf),
        (_, 6) => q4k_tile::<6>(tile, acts, outs, pf),
        (_, 7) => q4k_tile::<7>(tile, acts, outs, pf),
        (_, 8) => q4k_tile::<8>(tile, acts, outs, pf),
        _ => unreachable!("one to eight activation rows"),
    }
}

/// Activation rows the AVX-512 kernel takes per pass over a tile (the AVX2 one takes four).
pub const MAX_ROWS: usize = 8;

/// How many super-blocks ahead the weights are prefetched.
const PREFETCH_SBS: usize = 2;

/// Prefetches `lines` cache lines from `p` (an address past the tile is harmless).
#[inline(always)]
pub(crate) unsafe fn prefetch(p: *const u8, lines: usize) {
    for i in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * i) as *const i8);
    }
}

#[inline(always)]
pub(crate) unsafe fn bcast(p: *const i8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4k_tile<const MT: usize>(tile: &[u8], acts: &[Q8KRow], outs: &[*mut f32], pf: bool) {
    let kb = acts[0].d.len();
    assert!(tile.len() >= kb * q4k::BYTES && acts.len() == MT && outs.len() == MT);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); MT];
    for sb in 0..kb {
        let blk = tile.as_ptr().add(sb * q4k::BYTES);
        let x: [*const i8; MT] = std::array::from_fn(|m| acts[m].qs.as_ptr().add(sb * QK_K));
        let mut total = [_mm512_setzero_si512(); MT];
        for s in 0..8 {
            if pf {
                prefetch(blk.wrapping_add(PREFETCH_SBS * q4k::BYTES + 320 * s), 5);
            }
            let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(q4k::SC + 16 * s) as *const _));
            // Up to four rows: two sums per row (independent chains hide the latency);
            // more rows give enough chains with one sum each, which leaves registers for
            // them (integer sums: the same value either way).
            let mut lo_sum = [_mm512_setzero_si512(); MT];
            let mut hi_sum = [_mm512_setzero_si512(); MT];
            for g4 in 0..4 {
                let g = 4 * s + g4;
                let w = _mm512_loadu_si512(blk.add(q4k::QS + 64 * g) as *const _);
                let lo = _mm512_and_si512(w, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                for m in 0..MT {
                    lo_sum[m] = _mm512_dpbusd_epi32(lo_sum[m], lo, bcast(x[m].add(8 * g)));
                    let xh = bcast(x[m].add(8 * g + 4));
                    if MT > 4 {
                        lo_sum[m] = _mm512_dpbusd_epi32(lo_sum[m], hi, xh);
                    } else {
                        hi_sum[m] = _mm512_dpbusd_epi32(hi_sum[m], hi, xh);
                    }
                }
            }
            for m in 0..MT {
                let i = if MT > 4 {
                    lo_sum[m]
                } else {
                    _mm512_add_epi32(lo_sum[m], hi_sum[m])
                };
                total[m] = _mm512_add_epi32(total[m], _mm512_mullo_epi32(i, sc));
            }
        }
        let mut msum = [_mm512_setzero_si512(); MT];
        for p in 0..4 {
            let mn =
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(q4k::MN + 32 * p) as *const _));
            for m in 0..MT {
                let bs = &acts[m].bsums[sb * 16 + 4 * p..][..4];
                let (b0, b1) = (bs[0] + bs[1], bs[2] + bs[3]);
                let pair = (b0 as u16 as u32 | (b1 as u16 as u32) << 16) as i32;
                msum[m] = _mm512_add_epi32(msum[m], _mm512_madd_epi16(mn, _mm512_set1_epi32(pair)));
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(q4k::D) as *const _));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(q4k::DMIN) as *const _));
        for m in 0..MT {
            let da = _mm512_set1_ps(acts[m].d[sb]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[m]), _mm512_mul_ps(d, da), acc[m]);
            acc[m] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[m]), _mm512_mul_ps(dmin, da), acc[m]);
        }
    }
    for m in 0..MT {
        _mm512_storeu_ps(outs[m], acc[m]);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q6k_tile<const MT: usize>(tile: &[u8], acts: &[Q8KRow], outs: &[*mut f32], pf: bool) {
    let kb = acts[0].d.len();
    assert!(tile.len() >= kb * q6k::BYTES && acts.len() == MT && outs.len() == MT);
    let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    let mut acc = [_mm512_setzero_ps(); MT];
    for sb in 0..kb {
        let blk = tile.as_ptr().add(sb * q6k::BYTES);
        let x: [*const i8; MT] = std::array::from_fn(|m| acts[m].qs.as_ptr().add(sb * QK_K));
        let mut total = [_mm512_setzero_si512(); MT];
        for p in 0..16 {
            if pf {
                prefetch(blk.wrapping_add(PREFETCH_SBS * q6k::BYTES + 212 * p), 4);
            }
            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(q6k::SC + 16 * p) as *const _));
            let wa = _mm512_loadu_si512(blk.add(q6k::QL + 128 * p) as *const _);
            let wb = _mm512_loadu_si512(blk.add(q6k::QL + 128 * p + 64) as *const _);
            let h = _mm512_loadu_si512(blk.add(q6k::QH + 64 * p) as *const _);
            let lo_a = _mm512_or_si512(
                _mm512_and_si512(wa, m4),
                _mm512_and_si512(_mm512_slli_epi16(h, 4), m30),
            );
            let hi_a = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(wa, 4), m4),
                _mm512_and_si512(_mm512_slli_epi16(h, 2), m30),
            );
            let lo_b = _mm512_or_si512(_mm512_and_si512(wb, m4), _mm512_and_si512(h, m30));
            let hi_b = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(wb, 4), m4),
                _mm512_and_si512(_mm512_srli_epi16(h, 2), m30),
            );
            for m in 0..MT {
                let a = x[m].add(16 * p);
                let i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo_a, bcast(a));
                let i = _mm512_dpbusd_epi32(i, hi_a, bcast(a.add(4)));
                let j = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo_b, bcast(a.add(8)));
                let j = _mm512_dpbusd_epi32(j, hi_b, bcast(a.add(12)));
                let off = _mm512_set1_epi32(32 * acts[m].bsums[sb * 16 + p] as i32);
                let s = _mm512_sub_epi32(_mm512_add_epi32(i, j), off);
                total[m] = _mm512_add_epi32(total[m], _mm512_mullo_epi32(s, sc));
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(q6k::D) as *const _));
        for m in 0..MT {
            let da = _mm512_set1_ps(acts[m].d[sb]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[m]), _mm512_mul_ps(d, da), acc[m]);
        }
    }
    for m in 0..MT {
        _mm512_storeu_ps(outs[m], acc[m]);
    }
}

const _: () = assert!(TILE == 16);

/// The AVX2 kernel (CPUs without AVX-512 VNNI, or `EDGEINFER_NO_AVX512`): each tile in two
/// halves of eight rows, `vpdpbusd` emulated exactly by `vpmaddubsw` (no saturation: weights
/// are at most 63, activations at most 127 in magnitude) and `vpmaddwd` with ones.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; otherwise as [`tile`].
pub unsafe fn tile_avx2(kind: KKind, tile: &[u8], acts: &[Q8KRow], outs: &[*mut f32], pf: bool) {
    for half in 0..2 {
        match (kind, acts.len()) {
            (KKind::Q6K, 1) => q6k_half::<1>(tile, acts, outs, half, pf),
            (KKind::Q6K, 2) => q6k_half::<2>(tile, acts, outs, half, pf),
            (KKind::Q6K, 3) => q6k_half::<3>(tile, acts, outs, half, pf),
            (KKind::Q6K, 4) => q6k_half::<4>(tile, acts, outs, half, pf),
            (_, 1) => q4k_half::<1>(tile, acts, outs, half, pf),
            (_, 2) => q4k_half::<2>(tile, acts, outs, half, pf),
            (_, 3) => q4k_half::<3>(tile, acts, outs, half, pf),
            (_, 4) => q4k_half::<4>(tile, acts, outs, half, pf),
            _ => unreachable!("one to four activation rows"),
        }
    }
}

#[inline(always)]
unsafe fn bcast8(p: *const i8) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// `acc + w . a` per 32-bit lane (four byte products), as `vpdpbusd` (see [`tile_avx2`]).
#[inline(always)]
unsafe fn dp8(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(w, a);
    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_half<const MT: usize>(
    tile: &[u8],
    acts: &[Q8KRow],
    outs: &[*mut f32],
    half: usize,
    pf: bool,
) {
    let kb = acts[0].d.len();
    assert!(tile.len() >= kb * q4k::BYTES && acts.len() == MT && outs.len() == MT && half < 2);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); MT];
    for sb in 0..kb {
        let blk = tile.as_ptr().add(sb * q4k::BYTES);
        if pf && half == 0 {
            prefetch(blk.wrapping_add(PREFETCH_SBS * q4k::BYTES), q4k::BYTES / 64);
        }
        let x: [*const i8; MT] = std::array::from_fn(|m| acts[m].qs.as_ptr().add(sb * QK_K));
        let mut total = [_mm256_setzero_si256(); MT];
        for s in 0..8 {
            let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                blk.add(q4k::SC + 16 * s + 8 * half) as *const _
            ));
            let mut sum = [_mm256_setzero_si256(); MT];
            for g4 in 0..4 {
                let g = 4 * s + g4;
                let w = _mm256_loadu_si256(blk.add(q4k::QS + 64 * g + 32 * half) as *const _);
                let lo = _mm256_and_si256(w, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
                for m in 0..MT {
                    sum[m] = dp8(sum[m], lo, bcast8(x[m].add(8 * g)));
                    sum[m] = dp8(sum[m], hi, bcast8(x[m].add(8 * g + 4)));
                }
            }
            for m in 0..MT {
                total[m] = _mm256_add_epi32(total[m], _mm256_mullo_epi32(sum[m], sc));
            }
        }
        let mut msum = [_mm256_setzero_si256(); MT];
        for p in 0..4 {
            let mn = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                blk.add(q4k::MN + 32 * p + 16 * half) as *const _
            ));
            for m in 0..MT {
                let bs = &acts[m].bsums[sb * 16 + 4 * p..][..4];
                let (b0, b1) = (bs[0] + bs[1], bs[2] + bs[3]);
                let pair = (b0 as u16 as u32 | (b1 as u16 as u32) << 16) as i32;
                msum[m] = _mm256_add_epi32(msum[m], _mm256_madd_epi16(mn, _mm256_set1_epi32(pair)));
            }
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(q4k::D + 16 * half) as *const _));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(q4k::DMIN + 16 * half) as *const _));
        for m in 0..MT {
            let da = _mm256_set1_ps(acts[m].d[sb]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total[m]), _mm256_mul_ps(d, da), acc[m]);
            acc[m] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[m]), _mm256_mul_ps(dmin, da), acc[m]);
        }
    }
    for m in 0..MT {
        _mm256_storeu_ps(outs[m].add(8 * half), acc[m]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_half<const MT: usize>(
    tile: &[u8],
    acts: &[Q8KRow],
    outs: &[*mut f32],
    half: usize,
    pf: bool,
) {
    let kb = acts[0].d.len();
    assert!(tile.len() >= kb * q6k::BYTES && acts.len() == MT && outs.len() == MT && half < 2);
    let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let mut acc = [_mm256_setzero_ps(); MT];
    for sb in 0..kb {
        let blk = tile.as_ptr().add(sb * q6k::BYTES);
        if pf && half == 0 {
            prefetch(blk.wrapping_add(PREFETCH_SBS * q6k::BYTES), q6k::BYTES / 64);
        }
        let x: [*const i8; MT] = std::array::from_fn(|m| acts[m].qs.as_ptr().add(sb * QK_K));
        let mut total = [_mm256_setzero_si256(); MT];
        for p in 0..16 {
            let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                blk.add(q6k::SC + 16 * p + 8 * half) as *const _
            ));
            let line = |off: usize| _mm256_loadu_si256(blk.add(off + 32 * half) as *const _);
            let (wa, wb, h) = (
                line(q6k::QL + 128 * p),
                line(q6k::QL + 128 * p + 64),
                line(q6k::QH + 64 * p),
            );
            let lo_a = _mm256_or_si256(
                _mm256_and_si256(wa, m4),
                _mm256_and_si256(_mm256_slli_epi16(h, 4), m30),
            );
            let hi_a = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(wa, 4), m4),
                _mm256_and_si256(_mm256_slli_epi16(h, 2), m30),
            );
            let lo_b = _mm256_or_si256(_mm256_and_si256(wb, m4), _mm256_and_si256(h, m30));
            let hi_b = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(wb, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(h, 2), m30),
            );
            for m in 0..MT {
                let a = x[m].add(16 * p);
                let i = dp8(_mm256_setzero_si256(), lo_a, bcast8(a));
                let i = dp8(i, hi_a, bcast8(a.add(4)));
                let i = dp8(i, lo_b, bcast8(a.add(8)));
                let i = dp8(i, hi_b, bcast8(a.add(12)));
                let off = _mm256_set1_epi32(32 * acts[m].bsums[sb * 16 + p] as i32);
                let s = _mm256_sub_epi32(i, off);
                total[m] = _mm256_add_epi32(total[m], _mm256_mullo_epi32(s, sc));
            }
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(q6k::D + 16 * half) as *const _));
        for m in 0..MT {
            let da = _mm256_set1_ps(acts[m].d[sb]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total[m]), _mm256_mul_ps(d, da), acc[m]);
        }
    }
    for m in 0..MT {
        _mm256_storeu_ps(outs[m].add(8 * half), acc[m]);
    }
}
