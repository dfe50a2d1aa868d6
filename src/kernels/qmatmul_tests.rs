//! Quantized matmul tests: every type against the dequantized f32 product and candle, SIMD
//! against portable code bit for bit, shared activations, embeddings, the candle fallback.
use super::*;
use crate::kernels::cpu::PARALLEL_QUANT_VALUES;
use candle_core::Device;
use rand::{Rng, SeedableRng};

fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// Every supported type, several shapes and batch sizes: against the f32 product of the
/// dequantized weights (tolerance: 8-bit activation rounding, about 1% of the row norm),
/// and against candle's own quantized matmul (same math, different summation order).
#[test]
fn matches_dequantized_reference_and_candle() {
    for (i, dtype) in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0]
        .into_iter()
        .enumerate()
    {
        for &(rows, cols, n) in &[(48, 64, 1), (33, 96, 3), (16, 576, 7)] {
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
            let lin = Linear::from_qtensor(&qt).unwrap();
            assert!(matches!(lin, Linear::Native(_)));
            let got = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let tol = 0.01 * (cols as f32).sqrt();
            for r in 0..n {
                for c in 0..rows {
                    let (g, w, cd) = (got[r][c], want[r][c], candle[r][c]);
                    assert!(
                        (g - w).abs() < tol,
                        "{dtype:?} {rows}x{cols} n={n}: {g} vs {w}"
                    );
                    // candle rounds the Q8_1 block sum differently (f16 twice): ~1e-3 relative.
                    assert!(
                        (g - cd).abs() < 5e-3 * (1.0 + cd.abs()),
                        "{dtype:?}: {g} vs candle {cd}"
                    );
                }
            }
        }
    }
}

#[test]
fn simd_kernels_are_bit_identical_to_portable_ones() {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let w = random(48, 576, 9);
        let x = random(5, 576, 10)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let Linear::Native(m) =
            Linear::from_qtensor(&QTensor::quantize(&w, dtype).unwrap()).unwrap()
        else {
            panic!("native kernels for {dtype:?}");
        };
        let acts: Vec<Q8Row> = x
            .chunks_exact(576)
            .map(|r| {
                let mut q = Q8Row::default();
                quant::quantize_row(r, &mut q);
                q
            })
            .collect();
        let mut portable = vec![0f32; 48 * 5];
        for task in 0..48 / 8 {
            rows_portable(
                &m,
                task * 8,
                &mut portable[task * 8 * 5..(task + 1) * 8 * 5],
                &acts,
            );
        }
        #[cfg(target_arch = "x86_64")]
        if super::super::x86::available() {
            let mut fast = vec![0f32; 48 * 5];
            for task in 0..48 / 8 {
                unsafe {
                    rows_x86(
                        &m,
                        task * 8,
                        &mut fast[task * 8 * 5..(task + 1) * 8 * 5],
                        &acts,
                    )
                };
            }
            assert_eq!(fast, portable, "{dtype:?}");
            // One input row (a decode step) over rows 3..10: four at a time, then the rest.
            let mut one = vec![0f32; 7];
            unsafe { rows_x86(&m, 3, &mut one, &acts[..1]) };
            let want: Vec<f32> = (3..10).map(|r| portable[r * 5]).collect();
            assert_eq!(one, want, "{dtype:?}");
        }
        // The four-row kernels, with and without VNNI, agree with the single-row ones.
        #[cfg(target_arch = "x86_64")]
        if super::super::x86::available() {
            use super::super::x86;
            let nb = 576 / QK;
            let (mut dw, mut mw, mut buf) = (Vec::new(), Vec::new(), Vec::new());
            let four = [&acts[0], &acts[1], &acts[2], &acts[3]];
            let quad = x86::Quad::new(four);
            for r in 0..48 {
                let w = m.row_in(r, &mut buf);
                unsafe { x86::row_scales(m.kind, w, nb, &mut dw, &mut mw) };
                let want: Vec<f32> = (0..4).map(|i| portable[r * 5 + i]).collect();
                let got = unsafe { x86::dot4_quad(m.kind, w, &dw, &mw, four, &quad) };
                assert_eq!(got[..], want[..], "{dtype:?} row {r}");
                if x86::vnni_available() {
                    let got = unsafe { x86::dot4_quad_vnni(m.kind, w, &dw, &mw, four, &quad) };
                    assert_eq!(got[..], want[..], "{dtype:?} row {r} (VNNI)");
                }
            }
        }
        // Q4_1 and Q8_0 are kept in 16-row tiles where the CPU has their kernel.
        assert_eq!(
            m.tiled(),
            dtype != GgmlDType::Q4_0 && crate::kernels::qtile::tiled_here(),
            "{dtype:?}"
        );
        // And the public path (whichever kernel it picks: tiles for Q4_1 and Q8_0) agrees with both.
        let got = m.matmul(&x, 5);
        for i in 0..5 {
            for r in 0..48 {
                assert_eq!(got[i * 48 + r], portable[r * 5 + i]);
            }
        }
    }
}

#[test]
fn embedding_rows_equal_candles_dequantization() {
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        // 12 rows stay in GGML blocks; 32 rows go into tiles where the CPU has their kernels
        // (`from_qtensor`), so both layouts are read back.
        for rows in [12, 32] {
            let w = random(rows, 256, 4);
            let qt = QTensor::quantize(&w, dtype).unwrap();
            let want = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for lin in [
                Linear::from_qtensor_native(&qt).unwrap(),
                Linear::from_qtensor(&qt).unwrap(),
            ] {
                let got = lin.embedding(&[7, 0, 11]).unwrap();
                assert_eq!(got[..256], want[7][..], "{dtype:?}");
                assert_eq!(got[256..512], want[0][..], "{dtype:?}");
                assert_eq!(got[512..], want[11][..], "{dtype:?}");
            }
        }
    }
}

/// One set of activations serves layers of different types (each form quantized once,
/// rows in parallel above the threshold) with the same results as separate products.
#[test]
fn shared_activations_give_the_same_products() {
    let (n, cols) = (24, 768);
    assert!(n * cols >= PARALLEL_QUANT_VALUES);
    let x = random(n, cols, 7)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let shared = Activations::new(&x, n);
    for (i, dtype) in [
        GgmlDType::Q4_1,
        GgmlDType::Q5K,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q4_0,
    ]
    .into_iter()
    .enumerate()
    {
        let w = random(20, cols, 50 + i as u64);
        let lin = Linear::from_qtensor(&QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let alone = lin.matmul(&x, n).unwrap();
        assert_eq!(lin.apply(&shared).unwrap(), alone, "{dtype:?}");
    }
    assert!(shared.q8.get().is_some() && shared.q8k.get().is_some());
}

/// Layers kept in rows (Q4_0 always is) run in one loop: the same bits as each alone, for a
/// decode step's one input row and a prompt's several, row counts off the task size included.
#[test]
fn layers_in_rows_run_together_as_each_alone() {
    let cols = 576;
    let layers: Vec<Linear> = [48, 20, 8]
        .into_iter()
        .enumerate()
        .map(|(i, rows)| {
            let w = random(rows, cols, 80 + i as u64);
            Linear::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).unwrap()
        })
        .collect();
    for n in [1, 3, 5] {
        let x = random(n, cols, 9)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let a = Activations::new(&x, n);
        let many = Linear::apply_many(&layers.iter().collect::<Vec<_>>(), &a).unwrap();
        for (l, got) in layers.iter().zip(&many) {
            let Linear::Native(m) = l else {
                panic!("Q4_0 has our kernels")
            };
            let mut portable = vec![0f32; m.rows * n];
            rows_portable(m, 0, &mut portable, &a.q8().rows);
            let want: Vec<f32> = (0..n * m.rows)
                .map(|k| portable[(k % m.rows) * n + k / m.rows])
                .collect();
            assert_eq!(got, &want, "n {n}, {} rows", m.rows);
        }
    }
}

#[test]
fn other_types_fall_back_to_candle() {
    let w = random(8, 256, 3);
    let lin = Linear::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q2K).unwrap()).unwrap();
    assert!(matches!(lin, Linear::Candle(_)));
    for (dtype, native) in [
        (GgmlDType::Q4K, false),
        (GgmlDType::Q5K, true),
        (GgmlDType::Q6K, false),
    ] {
        let qt = QTensor::quantize(&w, dtype).unwrap();
        let lin = Linear::from_qtensor(&qt).unwrap();
        assert_eq!(matches!(lin, Linear::NativeK(_)), native, "{dtype:?}");
        let lin = Linear::from_qtensor_native(&qt).unwrap();
        assert!(matches!(lin, Linear::NativeK(_)), "{dtype:?}");
    }
}

#[test]
fn simd_activation_quantization_is_bit_identical_to_portable() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut x: Vec<f32> = (0..1536).map(|_| rng.gen_range(-3.0..3.0)).collect();
    // A zero block, and a block whose scaled values land on halves (ties go to even).
    x[32..64].fill(0.0);
    for (j, v) in x[64..96].iter_mut().enumerate() {
        *v = if j == 0 { 127.0 } else { j as f32 - 15.5 };
    }
    x[96] = -1e-30;
    // Blocks the vector code hands back to the portable one: a NaN, an infinity, vanishing
    // values (127 / amax overflows).
    x[130] = f32::NAN;
    x[170] = f32::NEG_INFINITY;
    x[192..224].fill(1e-38);
    let mut want = Q8Row::default();
    quant::quantize_row_portable(&x, &mut want);
    let mut got = Q8Row::default();
    quant::quantize_row(&x, &mut got);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(got.qs, want.qs);
    assert_eq!(bits(&got.d), bits(&want.d));
    assert_eq!(bits(&got.s), bits(&want.s));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        let mut fast = Q8Row::default();
        unsafe { super::super::x86::quantize_row_avx512(&x, &mut fast) };
        assert_eq!(fast.qs, want.qs);
        assert_eq!(bits(&fast.d), bits(&want.d));
        assert_eq!(bits(&fast.s), bits(&want.s));
        // The half-way values really were ties.
        assert_eq!(&want.qs[64..68], &[127, -14, -14, -12]);
    }
}

/// Tiles of every width, an odd number of blocks included (Q8_0 keeps blocks in pairs, so
/// its last block then sits alone): the GGML rows read back byte for byte, and the tile
/// kernel's products equal the portable ones bit for bit, for one to three input rows.
#[test]
fn tiles_of_odd_and_even_block_counts_read_back_and_multiply_exactly() {
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for cols in [32, 96, 160, 576] {
            let rows = 32;
            let qt = QTensor::quantize(&random(rows, cols, cols as u64), dtype).unwrap();
            let raw = qt.data().unwrap().to_vec();
            let kind = WeightKind::from_dtype(dtype).unwrap();
            let m = QMatrix::new(kind, rows, cols, &raw);
            assert_eq!(m.tiled(), crate::kernels::qtile::tiled_here(), "{dtype:?}");
            let bytes = raw.len() / rows;
            let mut buf = Vec::new();
            // The tiles read back byte for byte, whether or not this CPU keeps them.
            let tiles = QTiles::pack(kind, rows, cols, &raw);
            for r in 0..rows {
                let got = m.row_in(r, &mut buf);
                assert_eq!(got, &raw[r * bytes..][..bytes], "{dtype:?} {cols} row {r}");
                let got = tiles.row_into(r, &mut buf);
                assert_eq!(
                    got,
                    &raw[r * bytes..][..bytes],
                    "{dtype:?} {cols} tile row {r}"
                );
            }
            for n in 1..=3 {
                let x = random(n, cols, 7)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let acts: Vec<Q8Row> = x
                    .chunks_exact(cols)
                    .map(|r| {
                        let mut q = Q8Row::default();
                        quant::quantize_row(r, &mut q);
                        q
                    })
                    .collect();
                let mut portable = vec![0f32; rows * n];
                rows_portable(&m, 0, &mut portable, &acts);
                let got = m.matmul(&x, n);
                for i in 0..n {
                    for r in 0..rows {
                        assert_eq!(
                            got[i * rows + r].to_bits(),
                            portable[r * n + i].to_bits(),
                            "{dtype:?} cols {cols} n {n} row {r}"
                        );
                    }
                }
            }
        }
    }
}
