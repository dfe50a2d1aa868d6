//! Repacked K-quant tiles: the same values as GGML's blocks, products within float rounding
//! of the unpack-then-dot kernels, and the AVX-512 kernel equal to the portable one bit for bit.
use super::*;
use crate::kernels::kquant::KMatrix;
use crate::kernels::qmatmul::Linear;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

const KINDS: [(GgmlDType, KKind); 2] = [(GgmlDType::Q4K, KKind::Q4K), (GgmlDType::Q6K, KKind::Q6K)];

fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Rows of different magnitudes, so scales and mins vary between lanes.
    (0..rows * cols)
        .map(|i| rng.gen_range(-1.0..1.0f32) * (1.0 + (i / cols) as f32 * 0.37))
        .collect()
}

fn unpacked(w: &[f32], rows: usize, cols: usize, dtype: GgmlDType) -> KMatrix {
    let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap();
    match Linear::from_qtensor_native(&QTensor::quantize(&t, dtype).unwrap()).unwrap() {
        Linear::NativeK(m) => m,
        _ => panic!("native K kernels for {dtype:?}"),
    }
}

fn packed(m: &KMatrix) -> KPacked {
    KPacked::pack(m.kind, m.rows, m.cols, &m.data)
}

fn q8k(x: &[f32], cols: usize) -> Vec<Q8KRow> {
    crate::kernels::qmatmul::Activations::new(x, x.len() / cols)
        .q8k()
        .to_vec()
}

fn portable(m: &KPacked, acts: &[Q8KRow]) -> Vec<f32> {
    let mut out = vec![0f32; acts.len() * m.rows];
    for t in 0..m.rows / TILE {
        for (i, a) in acts.iter().enumerate() {
            let mut acc = [0f32; TILE];
            tile_portable(m.kind, m.tile(t), a, &mut acc);
            out[i * m.rows + t * TILE..][..TILE].copy_from_slice(&acc);
        }
    }
    out
}

#[test]
fn packed_rows_dequantize_to_the_same_values() {
    for (i, (dtype, kind)) in KINDS.into_iter().enumerate() {
        let (rows, cols) = (32, 512);
        let m = unpacked(&random(rows, cols, 7 + i as u64), rows, cols, dtype);
        let p = packed(&m);
        assert_eq!(p.kind, kind);
        for r in 0..rows {
            let (mut want, mut got) = (Vec::new(), Vec::new());
            kquant::dequantize_row(kind, m.row(r), &mut want);
            p.dequantize_row(r, &mut got);
            assert_eq!(want, got, "{dtype:?} row {r}");
        }
    }
}

/// Against the unpack-then-dot kernels, which sum the same exact integers in another float
/// order: within 1e-5 of the largest output magnitude.
#[test]
fn products_match_the_unpacked_kernels() {
    for (i, (dtype, _)) in KINDS.into_iter().enumerate() {
        for &(rows, cols, n) in &[(16, 256, 1), (48, 512, 5), (32, 1024, 9)] {
            let m = unpacked(&random(rows, cols, 11 + i as u64), rows, cols, dtype);
            let acts = q8k(&random(n, cols, 99 + rows as u64), cols);
            let want = m.matmul_q8k(&acts);
            let got = packed(&m).matmul_q8k(&acts);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(scale > 1.0);
            for (j, (w, g)) in want.iter().zip(&got).enumerate() {
                assert!(
                    (w - g).abs() <= 1e-5 * scale,
                    "{dtype:?} {rows}x{cols} n={n} [{j}]: {w} vs {g}"
                );
            }
            assert_eq!(
                portable(&packed(&m), &acts),
                got,
                "{dtype:?}: SIMD vs portable bits"
            );
        }
    }
}

/// Extreme inputs: the largest scales, mins and values, activations at +-127, so the integer
/// sums reach their bounds; SIMD and portable must agree bit for bit.
#[test]
fn extreme_blocks_agree_bit_for_bit() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (kind, bytes) in [(KKind::Q4K, 144), (KKind::Q6K, 210)] {
        let (rows, cols) = (16, 768);
        let mut data: Vec<u8> = (0..rows * cols / QK_K * bytes).map(|_| rng.gen()).collect();
        // Finite f16 scales (clear the exponent's top bit).
        for blk in data.chunks_exact_mut(bytes) {
            let at = if kind == KKind::Q6K {
                vec![208]
            } else {
                vec![0, 2]
            };
            for a in at {
                blk[a + 1] &= 0x3B;
            }
        }
        let p = KPacked::pack(kind, rows, cols, &data);
        let x: Vec<f32> = (0..3 * cols)
            .map(|i| {
                if i % 3 == 0 {
                    1.0
                } else if i % 7 == 0 {
                    -1.0
                } else {
                    0.5
                }
            })
            .collect();
        let acts = q8k(&x, cols);
        let got = p.matmul_q8k(&acts);
        assert!(got.iter().all(|v| v.is_finite()));
        assert_eq!(portable(&p, &acts), got, "{kind:?}");
    }
}

#[test]
fn linear_layers_choose_packed_tiles_where_the_cpu_has_them() {
    for (dtype, _) in KINDS {
        let t = Tensor::from_slice(&random(32, 256, 3), (32, 256), &Device::Cpu).unwrap();
        let lin = Linear::from_qtensor(&QTensor::quantize(&t, dtype).unwrap()).unwrap();
        let packed = matches!(lin, Linear::Packed(_));
        assert_eq!(
            packed,
            crate::kernels::qmatmul::packed_preferred(),
            "{dtype:?}"
        );
        // 8 rows cannot fill a tile: candle's kernels.
        let t = Tensor::from_slice(&random(8, 256, 3), (8, 256), &Device::Cpu).unwrap();
        let lin = Linear::from_qtensor(&QTensor::quantize(&t, dtype).unwrap()).unwrap();
        assert!(matches!(lin, Linear::Candle(_)), "{dtype:?}");
    }
}

#[test]
fn simd_q8k_quantization_gives_the_portable_bytes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut rows: Vec<Vec<f32>> = (0..20)
        .map(|i| {
            (0..512)
                .map(|_| rng.gen_range(-1.0..1.0f32) * (i as f32 + 0.5))
                .collect()
        })
        .collect();
    rows.push(vec![0.0; 256]);
    // Ties: the same magnitude with both signs (the first one sets the sign), halves.
    rows.push(
        (0..256)
            .map(|i| {
                if i == 7 {
                    -2.0
                } else if i == 9 {
                    2.0
                } else {
                    (i % 5) as f32 * 0.5
                }
            })
            .collect(),
    );
    rows.push(
        (0..256)
            .map(|i| if i == 3 { f32::NAN } else { i as f32 })
            .collect(),
    );
    rows.push(
        (0..256)
            .map(|i| if i == 3 { f32::INFINITY } else { -(i as f32) })
            .collect(),
    );
    for (i, x) in rows.iter().enumerate() {
        let (mut want, mut got) = (Q8KRow::default(), Q8KRow::default());
        kquant::quantize_row_q8k_portable(x, &mut want);
        kquant::quantize_row_q8k(x, &mut got);
        assert_eq!(want.qs, got.qs, "row {i}");
        assert_eq!(want.bsums, got.bsums, "row {i}");
        assert_eq!(
            want.d.iter().map(|d| d.to_bits()).collect::<Vec<_>>(),
            got.d.iter().map(|d| d.to_bits()).collect::<Vec<_>>(),
            "row {i}"
        );
    }
}

/// The AVX2 kernel (run by CPUs without AVX-512 VNNI) against the portable code, bit for bit,
/// for one to four activation rows at a time.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_kernel_gives_the_portable_bits() {
    if !crate::kernels::x86::available() {
        return;
    }
    for (i, (dtype, _)) in KINDS.into_iter().enumerate() {
        let (rows, cols) = (32, 768);
        let m = packed(&unpacked(
            &random(rows, cols, 21 + i as u64),
            rows,
            cols,
            dtype,
        ));
        for n in 1..=4 {
            let acts = q8k(&random(n, cols, 40 + n as u64), cols);
            let want = portable(&m, &acts);
            let mut got = vec![0f32; n * rows];
            for t in 0..rows / TILE {
                let outs: Vec<*mut f32> = (0..n)
                    .map(|j| got[j * rows + t * TILE..].as_mut_ptr())
                    .collect();
                // Safety: AVX2 checked above; each pointer has 16 outputs.
                unsafe {
                    crate::kernels::kpack_x86::tile_avx2(
                        m.kind,
                        m.tile(t),
                        &acts,
                        &outs,
                        t % 2 == 0,
                    )
                };
            }
            assert_eq!(want, got, "{dtype:?} n={n}");
        }
    }
}

/// The AVX-512 VNNI kernel against the portable code, bit for bit, for one to eight
/// activation rows per pass, and a 13-row product (passes of eight and five).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_kernel_gives_the_portable_bits_for_up_to_eight_rows() {
    if !crate::kernels::kpack::simd_available() {
        return;
    }
    for (i, (dtype, _)) in KINDS.into_iter().enumerate() {
        let (rows, cols) = (32, 768);
        let m = packed(&unpacked(
            &random(rows, cols, 61 + i as u64),
            rows,
            cols,
            dtype,
        ));
        for n in 1..=crate::kernels::kpack_x86::MAX_ROWS {
            let acts = q8k(&random(n, cols, 80 + n as u64), cols);
            let want = portable(&m, &acts);
            let mut got = vec![0f32; n * rows];
            for t in 0..rows / TILE {
                let outs: Vec<*mut f32> = (0..n)
                    .map(|j| got[j * rows + t * TILE..].as_mut_ptr())
                    .collect();
                // Safety: AVX-512 VNNI checked above; each pointer has 16 outputs.
                unsafe {
                    crate::kernels::kpack_x86::tile(m.kind, m.tile(t), &acts, &outs, t % 2 == 0)
                };
            }
            assert_eq!(want, got, "{dtype:?} n={n}");
        }
        let acts = q8k(&random(13, cols, 99), cols);
        assert_eq!(portable(&m, &acts), m.matmul_q8k(&acts), "{dtype:?} n=13");
    }
}
