//! Attention tests: portable vs SIMD bit identity, block tables, the task plan, a plain
//! f64 reference, causality.
use super::*;
use rand::{Rng, SeedableRng};

/// One sequence over contiguous K/V (a block table of one-row blocks in order).
fn causal_attention(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    t: usize,
    start: usize,
    s: AttentionShape,
) -> Vec<f32> {
    let stride = s.n_kv_head * s.head_dim;
    let blocks: Vec<u32> = (0..(k.len() / stride) as u32).collect();
    let kv = KvView {
        k,
        v,
        blocks: &blocks,
        block_size: 1,
        stride,
    };
    packed_attention(
        q,
        &[AttentionSeq {
            row: 0,
            len: t,
            start,
            kv,
        }],
        s,
    )
}

#[test]
fn f16c_accumulation_is_bit_identical_to_the_generic_one() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (hd, len) = (64, 37);
    let v: Vec<f16> = (0..len * hd)
        .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
        .collect();
    let blocks: Vec<u32> = (0..len as u32).collect();
    let kv = KvView {
        k: &v,
        v: &v,
        blocks: &blocks,
        block_size: 1,
        stride: hd,
    };
    let scores: Vec<f32> = (0..len).map(|_| rng.gen_range(-6.0..6.0)).collect();
    let mut generic = vec![0f32; hd];
    let mut vr = vec![0f32; hd];
    softmax_accumulate(&scores, 0.125, &mut generic, |j, dst| {
        kv.v[kv.row(j)..][..hd].convert_to_f32_slice(&mut vr);
        dst.copy_from_slice(&vr);
    });
    #[cfg(target_arch = "x86_64")]
    if super::super::x86::available() {
        let mut fast = vec![0f32; hd];
        unsafe { super::super::attention_x86::accumulate(&scores, 0.125, &mut fast, kv, 0) };
        assert_eq!(fast, generic);
    }
}

#[test]
fn block_tables_and_packing_change_nothing() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let shape = AttentionShape {
        n_head: 4,
        n_kv_head: 2,
        head_dim: 8,
    };
    let stride = 16;
    // Two sequences: 5 cached + 2 new, and 0 cached + 3 new; blocks of 2 rows, scattered.
    let (bs, n_blocks) = (2, 16);
    let k: Vec<f16> = (0..bs * n_blocks * stride)
        .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
        .collect();
    let v: Vec<f16> = (0..bs * n_blocks * stride)
        .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
        .collect();
    let (table_a, table_b) = (vec![9u32, 3, 14, 0], vec![7u32, 12]);
    let q: Vec<f32> = (0..5 * 4 * 8).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let view = |blocks: &'static [u32]| KvView {
        k: &k,
        v: &v,
        blocks,
        block_size: bs,
        stride,
    };
    let table_a: &'static [u32] = Box::leak(table_a.into_boxed_slice());
    let table_b: &'static [u32] = Box::leak(table_b.into_boxed_slice());
    let packed = packed_attention(
        &q,
        &[
            AttentionSeq {
                row: 0,
                len: 2,
                start: 5,
                kv: view(table_a),
            },
            AttentionSeq {
                row: 2,
                len: 3,
                start: 0,
                kv: view(table_b),
            },
        ],
        shape,
    );
    // The same sequences alone, over K/V copied out to contiguous rows.
    let gather = |blocks: &[u32], n: usize| -> (Vec<f16>, Vec<f16>) {
        let kv = KvView {
            k: &k,
            v: &v,
            blocks,
            block_size: bs,
            stride,
        };
        let rows = |src: &[f16]| {
            (0..n)
                .flat_map(|p| src[kv.row(p)..][..stride].to_vec())
                .collect::<Vec<_>>()
        };
        (rows(&k), rows(&v))
    };
    let (ka, va) = gather(table_a, 7);
    let alone_a = causal_attention(&q[..2 * 32], &ka, &va, 2, 5, shape);
    let (kb, vb) = gather(table_b, 3);
    let alone_b = causal_attention(&q[2 * 32..], &kb, &vb, 3, 0, shape);
    assert_eq!(packed[..2 * 32], alone_a[..]);
    assert_eq!(packed[2 * 32..], alone_b[..]);
}

#[test]
fn avx2_path_is_bit_identical_to_the_portable_one() {
    #[cfg(target_arch = "x86_64")]
    if super::super::x86::available() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for &(n_head, n_kv_head, hd) in
            &[(9, 3, 64), (8, 2, 64), (32, 8, 128), (4, 4, 16), (6, 2, 8)]
        {
            let shape = AttentionShape {
                n_head,
                n_kv_head,
                head_dim: hd,
            };
            let stride = n_kv_head * hd;
            let (bs, n_blocks) = (4, 64);
            let mut gen = |n: usize| -> Vec<f16> {
                (0..n)
                    .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
                    .collect()
            };
            let k = gen(bs * n_blocks * stride);
            let v = gen(bs * n_blocks * stride);
            // (cached, new) per sequence: decodes, a long prefill, odd key counts.
            let plan: [(usize, usize); 5] = [(0, 1), (37, 1), (0, 13), (90, 20), (5, 3)];
            let mut tables: Vec<Vec<u32>> = Vec::new();
            let mut next = 0u32;
            for &(c, t) in &plan {
                let n = (c + t).div_ceil(bs) as u32;
                // Reversed, so no table is in order.
                tables.push((next..next + n).rev().collect());
                next += n;
            }
            let rows: usize = plan.iter().map(|p| p.1).sum();
            let q: Vec<f32> = (0..rows * n_head * hd)
                .map(|_| rng.gen_range(-2.0..2.0))
                .collect();
            let mut row = 0;
            let seqs: Vec<AttentionSeq> = plan
                .iter()
                .zip(&tables)
                .map(|(&(c, t), table)| {
                    let s = AttentionSeq {
                        row,
                        len: t,
                        start: c,
                        kv: KvView {
                            k: &k,
                            v: &v,
                            blocks: table,
                            block_size: bs,
                            stride,
                        },
                    };
                    row += t;
                    s
                })
                .collect();
            let portable = packed_attention_with(&q, &seqs, shape, None);
            let mut variants = vec![Variant::Avx2];
            if super::super::attention_x86::best() == Some(Variant::Avx512) {
                variants.push(Variant::Avx512);
            }
            for v in variants {
                let fast = packed_attention_with(&q, &seqs, shape, Some(v));
                assert!(
                    fast.iter()
                        .zip(&portable)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{v:?}, shape {:?}",
                    (n_head, n_kv_head, hd)
                );
                // Each sequence alone (another task split) gives the same bits.
                let alone = packed_attention_with(&q[..n_head * hd], &seqs[..1], shape, Some(v));
                assert_eq!(alone[..], fast[..n_head * hd]);
            }
        }
    }
}

#[test]
fn the_plan_covers_every_row_and_head_once() {
    let shape = AttentionShape {
        n_head: 9,
        n_kv_head: 3,
        head_dim: 8,
    };
    let k = [f16::ZERO; 8];
    let kv = KvView {
        k: &k,
        v: &k,
        blocks: &[],
        block_size: 1,
        stride: 24,
    };
    for lens in [vec![1], vec![1, 1], vec![30], vec![1, 7, 100], vec![1; 40]] {
        let seqs: Vec<AttentionSeq> = lens
            .iter()
            .map(|&len| AttentionSeq {
                row: 0,
                len,
                start: 3,
                kv,
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in plan(&seqs, shape) {
            for r in t.rows.clone() {
                for h in t.heads.clone() {
                    assert_eq!(h / 3, t.kvh, "a head outside its KV group");
                    assert!(seen.insert((t.seq, r, h)), "done twice");
                }
            }
        }
        assert_eq!(seen.len(), lens.iter().sum::<usize>() * 9, "{lens:?}");
    }
    // One decoding sequence: its three groups stay whole when they divide evenly among the
    // threads; on two threads the last is halved (3, 3, 2 and 1 heads); a single KV head (MQA)
    // is split by heads so every core works.
    let one = [AttentionSeq {
        row: 0,
        len: 1,
        start: 3,
        kv,
    }];
    let threads = crate::kernels::pool::threads();
    let heads: Vec<usize> = plan(&one, shape).iter().map(|t| t.heads.len()).collect();
    match threads {
        1 | 3 => assert_eq!(heads, [3, 3, 3]),
        2 => assert_eq!(heads, [3, 3, 2, 1]),
        _ => {}
    }
    let mqa = AttentionShape {
        n_head: 8,
        n_kv_head: 1,
        head_dim: 8,
    };
    assert_eq!(plan(&one, mqa).len(), threads.min(8));
}

/// Plain two-pass softmax attention in f64 over the same (f16) inputs.
fn reference(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    t: usize,
    start: usize,
    s: AttentionShape,
) -> Vec<f32> {
    let hd = s.head_dim;
    let group = s.n_head / s.n_kv_head;
    let stride = s.n_kv_head * hd;
    let mut out = vec![0f32; t * s.n_head * hd];
    for i in 0..t {
        for h in 0..s.n_head {
            let off = (h / group) * hd;
            let qr = &q[(i * s.n_head + h) * hd..][..hd];
            let scores: Vec<f64> = (0..=start + i)
                .map(|j| {
                    let kr = &k[j * stride + off..][..hd];
                    qr.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * b.to_f64())
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let y: f64 = e
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * v[j * stride + off + d].to_f64())
                    .sum::<f64>()
                    / z;
                out[(i * s.n_head + h) * hd + d] = y as f32;
            }
        }
    }
    out
}

#[test]
fn matches_plain_softmax_attention_within_f16_tolerance() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for &(n_head, n_kv_head, hd, t, start) in &[
        (4, 2, 16, 5, 0),
        (9, 3, 64, 1, 37),
        (8, 8, 32, 7, 11),
        (6, 1, 8, 3, 2),
    ] {
        let shape = AttentionShape {
            n_head,
            n_kv_head,
            head_dim: hd,
        };
        let kv = (start + t) * n_kv_head * hd;
        let q: Vec<f32> = (0..t * n_head * hd)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        let k: Vec<f16> = (0..kv)
            .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
            .collect();
        let v: Vec<f16> = (0..kv)
            .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
            .collect();
        let got = causal_attention(&q, &k, &v, t, start, shape);
        let want = reference(&q, &k, &v, t, start, shape);
        let max_err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // f16 rounding of Q and of the running V sum: about 3 decimal digits.
        assert!(
            max_err < 2e-2,
            "shape {:?}: max error {max_err}",
            (n_head, n_kv_head, hd, t, start)
        );
    }
}

#[test]
fn causality_future_keys_do_not_matter() {
    let shape = AttentionShape {
        n_head: 2,
        n_kv_head: 1,
        head_dim: 4,
    };
    let q = vec![0.5f32; 3 * 2 * 4];
    let mut k: Vec<f16> = (0..3 * 4).map(|i| f16::from_f32(i as f32 / 10.0)).collect();
    let mut v: Vec<f16> = (0..3 * 4).map(|i| f16::from_f32(i as f32)).collect();
    let before = causal_attention(&q, &k, &v, 3, 0, shape);
    // Change the last position's key and value: rows 0 and 1 must not move.
    for x in &mut k[8..] {
        *x = f16::from_f32(9.0);
    }
    for x in &mut v[8..] {
        *x = f16::from_f32(-9.0);
    }
    let after = causal_attention(&q, &k, &v, 3, 0, shape);
    assert_eq!(before[..16], after[..16]);
    assert_ne!(before[16..], after[16..]);
    // The first query sees only itself: its output is its own value row.
    assert_eq!(before[..4], [0.0, 1.0, 2.0, 3.0]);
}
