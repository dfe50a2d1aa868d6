//! K-quant tests: against the f32 product of the dequantized weights, against candle's
//! quantized matmul and Q8_K quantization, and AVX2 against portable code bit for bit.
use super::*;
use crate::kernels::qmatmul::Linear;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};

const KINDS: [(GgmlDType, KKind); 3] = [
    (GgmlDType::Q4K, KKind::Q4K),
    (GgmlDType::Q5K, KKind::Q5K),
    (GgmlDType::Q6K, KKind::Q6K),
];

fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn kmatrix(w: &Tensor, dtype: GgmlDType) -> KMatrix {
    match Linear::from_qtensor_native(&QTensor::quantize(w, dtype).unwrap()).unwrap() {
        Linear::NativeK(m) => m,
        _ => panic!("native K kernels for {dtype:?}"),
    }
}

fn q8k(x: &[f32], cols: usize) -> Vec<Q8KRow> {
    x.chunks_exact(cols)
        .map(|r| {
            let mut q = Q8KRow::default();
            quantize_row_q8k(r, &mut q);
            q
        })
        .collect()
}

/// Tolerances: against the dequantized f32 product, the 8-bit activation rounding (about 1% of
/// the row norm); against candle, which sums the same exact integers in another float order,
/// 1e-4 relative.
#[test]
fn matches_dequantized_reference_and_candle() {
    for (i, (dtype, _)) in KINDS.into_iter().enumerate() {
        for &(rows, cols, n) in &[(16, 256, 1), (33, 512, 5), (9, 1024, 9)] {
            let w = random(rows, cols, 1 + i as u64);
            let x = random(n, cols, 100 + rows as u64);
            let qt = QTensor::quantize(&w, dtype).unwrap();
            let wq = qt.dequantize(&Device::Cpu).unwrap();
            let want = x
                .matmul(&wq.t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .forward(&x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = Linear::from_qtensor_native(&qt)
                .unwrap()
                .forward(&x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let tol = 0.01 * (cols as f32).sqrt();
            for r in 0..n {
                for c in 0..rows {
                    let (g, w, cd) = (got[r][c], want[r][c], candle[r][c]);
                    assert!(
                        (g - w).abs() < tol,
                        "{dtype:?} {rows}x{cols} n={n}: {g} vs {w}"
                    );
                    assert!(
                        (g - cd).abs() < 1e-4 * (1.0 + cd.abs()),
                        "{dtype:?}: {g} vs candle {cd}"
                    );
                }
            }
        }
    }
}

/// Our Q8_K rows are byte for byte candle's (llama.cpp's) Q8_K blocks.
#[test]
fn q8k_quantization_equals_candles() {
    let mut x = random(1, 768, 5)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    x[256..512].fill(0.0); // an all-zero super-block
    x[600] = -3.0; // the largest magnitude negative
    let t = Tensor::from_vec(x.clone(), (1, 768), &Device::Cpu).unwrap();
    let bytes = QTensor::quantize(&t, GgmlDType::Q8K)
        .unwrap()
        .data()
        .unwrap()
        .into_owned();
    let ours = &q8k(&x, 768)[0];
    let block = 4 + 256 + 32;
    assert_eq!(bytes.len(), 3 * block);
    for sb in 0..3 {
        let b = &bytes[sb * block..(sb + 1) * block];
        let d = f32::from_le_bytes(b[..4].try_into().unwrap());
        assert_eq!(d.to_bits(), ours.d[sb].to_bits(), "scale of {sb}");
        let qs: Vec<i8> = b[4..260].iter().map(|&v| v as i8).collect();
        assert_eq!(qs[..], ours.qs[sb * 256..(sb + 1) * 256], "values of {sb}");
        let bsums: Vec<i16> = b[260..]
            .chunks_exact(2)
            .map(|p| i16::from_le_bytes([p[0], p[1]]))
            .collect();
        assert_eq!(
            bsums[..],
            ours.bsums[sb * 16..(sb + 1) * 16],
            "sums of {sb}"
        );
    }
}

#[test]
fn simd_kernels_are_bit_identical_to_portable_ones() {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::x86::available() {
        for (i, (dtype, kind)) in KINDS.into_iter().enumerate() {
            let (rows, cols, n) = (24, 768, 7);
            let m = kmatrix(&random(rows, cols, 20 + i as u64), dtype);
            assert_eq!(m.kind, kind);
            let x = random(n, cols, 30)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let acts = q8k(&x, cols);
            let (mut slow, mut fast) = (KRow::default(), KRow::default());
            for r in 0..rows {
                unpack_row(kind, m.row(r), &mut slow);
                unsafe { crate::kernels::kquant_x86::unpack_row(kind, m.row(r), &mut fast) };
                assert_eq!(slow.q, fast.q, "{dtype:?} row {r}");
                assert_eq!((&slow.sc, &slow.mn), (&fast.sc, &fast.mn));
                for a in &acts {
                    let want = dot(&slow, a);
                    let got = unsafe { crate::kernels::kquant_x86::dot(&fast, a) };
                    assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} row {r}");
                }
            }
            // Whole tasks: four rows at once plus the remainder, 256- and 512-bit, against the
            // portable loop.
            let mut portable = vec![0f32; rows * n];
            let (mut narrow, mut wide) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            use crate::kernels::kquant_x86 as kx;
            for t in 0..rows / 8 {
                let range = t * 8 * n..(t + 1) * 8 * n;
                rows_portable(&m, t * 8, &mut portable[range.clone()], &acts);
                unsafe { kx::rows256(&m, t * 8, &mut narrow[range.clone()], &acts) };
                if kx::wide_available() {
                    unsafe { kx::rows512(&m, t * 8, &mut wide[range], &acts) };
                }
            }
            assert_eq!(narrow, portable, "{dtype:?}");
            if kx::wide_available() {
                assert_eq!(wide, portable, "{dtype:?} (AVX-512)");
            }
            let got = m.matmul(&x, n);
            for j in 0..n {
                for r in 0..rows {
                    assert_eq!(got[j * rows + r], portable[r * n + j]);
                }
            }
        }
    }
}
