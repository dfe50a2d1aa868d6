//! The AVX-512 VNNI kernel for [`super::kpack`]'s tiles: sixteen weight rows in the 32-bit
//! lanes of one vector, up to four activation rows per pass over the weights. Bit-identical
//! to [`super::kpack::tile_portable`] (exact integer sums, then the same two FMAs per
//! super-block per lane).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::kpack::{q4k, q6k, TILE};
use super::kquant::{KKind, Q8KRow, QK_K};

/// Tile `tile` against `acts` (one to four rows), writing 16 outputs at each of `outs`.
///
/// # Safety
/// The CPU must support AVX-512F, BW and VNNI; each `outs[i]` must be valid for 16 writes;
/// `tile` is a whole tile of `kind` for rows as wide as `acts`'.
pub unsafe fn tile(kind: KKind, tile: &[u8], acts: &[Q8KRow], outs: &[*mut f32]) {
    match (kind, acts.len()) {
        (KKind::Q6K, 1) => q6k_tile::<1>(tile, acts, outs),
        (KKind::Q6K, 2) => q6k_tile::<2>(tile, acts, outs),
        (KKind::Q6K, 3) => q6k_tile::<3>(tile, acts, outs),
        (KKind::Q6K, 4) => q6k_tile::<4>(tile, acts, outs),
        (_, 1) => q4k_tile::<1>(tile, acts, outs),
        (_, 2) => q4k_tile::<2>(tile, acts, outs),
        (_, 3) => q4k_tile::<3>(tile, acts, outs),
        (_, 4) => q4k_tile::<4>(tile, acts, outs),
        _ => unreachable!("one to four activation rows"),
    }
}

/// How many super-blocks ahead the weights are prefetched.
const PREFETCH_SBS: usize = 2;

/// Prefetches `lines` cache lines from `p` (an address past the tile is harmless).
#[inline(always)]
unsafe fn prefetch(p: *const u8, lines: usize) {
    for i in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * i) as *const i8);
    }
}

#[inline(always)]
unsafe fn bcast(p: *const i8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4k_tile<const MT: usize>(tile: &[u8], acts: &[Q8KRow], outs: &[*mut f32]) {
    let kb = acts[0].d.len();
    assert!(tile.len() >= kb * q4k::BYTES && acts.len() == MT && outs.len() == MT);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); MT];
    for sb in 0..kb {
        let blk = tile.as_ptr().add(sb * q4k::BYTES);
        let x: [*const i8; MT] = std::array::from_fn(|m| acts[m].qs.as_ptr().add(sb * QK_K));
        let mut total = [_mm512_setzero_si512(); MT];
        for s in 0..8 {
            prefetch(blk.wrapping_add(PREFETCH_SBS * q4k::BYTES + 320 * s), 5);
            let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(q4k::SC + 16 * s) as *const _));
            let mut lo_sum = [_mm512_setzero_si512(); MT];
            let mut hi_sum = [_mm512_setzero_si512(); MT];
            for g4 in 0..4 {
                let g = 4 * s + g4;
                let w = _mm512_loadu_si512(blk.add(q4k::QS + 64 * g) as *const _);
                let lo = _mm512_and_si512(w, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                for m in 0..MT {
                    lo_sum[m] = _mm512_dpbusd_epi32(lo_sum[m], lo, bcast(x[m].add(8 * g)));
                    hi_sum[m] = _mm512_dpbusd_epi32(hi_sum[m], hi, bcast(x[m].add(8 * g + 4)));
                }
            }
            for m in 0..MT {
                let i = _mm512_add_epi32(lo_sum[m], hi_sum[m]);
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
unsafe fn q6k_tile<const MT: usize>(tile: &[u8], acts: &[Q8KRow], outs: &[*mut f32]) {
    let kb = acts[0].d.len();
    assert!(tile.len() >= kb * q6k::BYTES && acts.len() == MT && outs.len() == MT);
    let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    let mut acc = [_mm512_setzero_ps(); MT];
    for sb in 0..kb {
        let blk = tile.as_ptr().add(sb * q6k::BYTES);
        let x: [*const i8; MT] = std::array::from_fn(|m| acts[m].qs.as_ptr().add(sb * QK_K));
        let mut total = [_mm512_setzero_si512(); MT];
        for p in 0..16 {
            prefetch(blk.wrapping_add(PREFETCH_SBS * q6k::BYTES + 212 * p), 4);
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
