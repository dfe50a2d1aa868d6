//! A LoRA adapter's low-rank update of one linear layer, on the CPU: `y += s · B·(A·x)` for
//! the rows of the sequences that use the adapter.
//!
//! `A` is `rank × n_in` and `B` is `n_out × rank` (PEFT's and llama.cpp's `lora_a` /
//! `lora_b`). `B` is kept transposed, so each row's update is `rank` contiguous axpys over
//! `n_out` values, which the compiler vectorises; `A·x` is `rank` dot products.

use super::cpu::PARALLEL_QUANT_VALUES;

/// One adapted weight's pair, in f32.
#[derive(Clone, Debug)]
pub struct LowRank {
    rank: usize,
    n_in: usize,
    n_out: usize,
    /// `rank × n_in`, row-major.
    a: Vec<f32>,
    /// `Bᵀ`: `rank × n_out`, row-major.
    b_t: Vec<f32>,
}

impl LowRank {
    /// From `a` (`rank × n_in`) and `b` (`n_out × rank`), row-major. `None` when the
    /// lengths do not match the shape.
    pub fn new(a: Vec<f32>, b: &[f32], rank: usize, n_in: usize, n_out: usize) -> Option<Self> {
        if rank == 0 || a.len() != rank * n_in || b.len() != n_out * rank {
            return None;
        }
        let mut b_t = vec![0f32; rank * n_out];
        for (o, row) in b.chunks_exact(rank).enumerate() {
            for (k, &v) in row.iter().enumerate() {
                b_t[k * n_out + o] = v;
            }
        }
        Some(Self {
            rank,
            n_in,
            n_out,
            a,
            b_t,
        })
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// `y[r] += scale · B·A·x[r]` for each row `r` in `rows` of the row-major `x` (`n_in`
    /// wide) and `y` (`n_out` wide).
    pub fn add_rows(&self, y: &mut [f32], x: &[f32], rows: &[usize], scale: f32) {
        let (n_in, n_out) = (self.n_in, self.n_out);
        debug_assert_eq!(x.len() / n_in.max(1), y.len() / n_out.max(1));
        let fma = fma_available();
        let one = |r: usize, out: &mut [f32]| {
            let xr = &x[r * n_in..(r + 1) * n_in];
            #[cfg(target_arch = "x86_64")]
            if fma {
                // Safety: the CPU has AVX2 and FMA (checked above).
                return unsafe { update_fma(&self.a, &self.b_t, xr, out, scale) };
            }
            let _ = fma;
            update::<false>(&self.a, &self.b_t, xr, out, scale)
        };
        let work = rows.len() * self.rank * (n_in + n_out);
        if rows.len() > 1 && work >= PARALLEL_QUANT_VALUES * 4 {
            let mut wanted = vec![false; y.len() / n_out];
            rows.iter().for_each(|&r| wanted[r] = true);
            super::pool::for_chunks_mut(y, n_out, |r, out| {
                if wanted[r] {
                    one(r, out)
                }
            });
        } else {
            for &r in rows {
                one(r, &mut y[r * n_out..(r + 1) * n_out]);
            }
        }
    }
}

fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`update`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_fma(a: &[f32], b_t: &[f32], x: &[f32], out: &mut [f32], scale: f32) {
    update::<true>(a, b_t, x, out, scale)
}

/// One row: `out += scale · B·(A·x)`, with `a` as `rank × x.len()` and `b_t` as
/// `rank × out.len()`. `FMA`: fused multiply-adds (only where the CPU has them).
#[inline(always)]
fn update<const FMA: bool>(a: &[f32], b_t: &[f32], x: &[f32], out: &mut [f32], scale: f32) {
    let mad = |x: f32, y: f32, acc: f32| if FMA { x.mul_add(y, acc) } else { acc + x * y };
    for (a, b) in a.chunks_exact(x.len()).zip(b_t.chunks_exact(out.len())) {
        // A dot product in sixteen lanes: vectorised, and in a fixed order, so a row's
        // result does not depend on the rows beside it.
        let mut acc = [0f32; 16];
        let (ca, cx) = (a.chunks_exact(16), x.chunks_exact(16));
        let mut tail = 0f32;
        for (p, q) in ca.remainder().iter().zip(cx.remainder()) {
            tail = mad(*p, *q, tail);
        }
        for (p, q) in ca.zip(cx) {
            for i in 0..16 {
                acc[i] = mad(p[i], q[i], acc[i]);
            }
        }
        let t = scale * (acc.iter().sum::<f32>() + tail);
        for (o, &bv) in out.iter_mut().zip(b) {
            *o = mad(t, bv, *o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    /// `y + s·B·A·x` computed the plain way, with B as given (not transposed).
    fn reference(
        a: &[f32],
        b: &[f32],
        x: &[f32],
        y: &[f32],
        shape: (usize, usize, usize),
        s: f32,
    ) -> Vec<f32> {
        let (rank, n_in, n_out) = shape;
        let t: Vec<f32> = (0..rank)
            .map(|k| (0..n_in).map(|i| a[k * n_in + i] * x[i]).sum())
            .collect();
        (0..n_out)
            .map(|o| y[o] + s * (0..rank).map(|k| b[o * rank + k] * t[k]).sum::<f32>())
            .collect()
    }

    #[test]
    fn adds_the_low_rank_product_to_the_rows_named_only() {
        for &(rank, n_in, n_out, n) in &[(4, 20, 12, 3), (16, 576, 1536, 40)] {
            let (a, b) = (values(rank * n_in, 1), values(n_out * rank, 2));
            let x = values(n * n_in, 3);
            let y0 = values(n * n_out, 4);
            let lr = LowRank::new(a.clone(), &b, rank, n_in, n_out).unwrap();
            let rows: Vec<usize> = (0..n).filter(|r| r % 3 != 1).collect();
            let mut y = y0.clone();
            lr.add_rows(&mut y, &x, &rows, 0.75);
            for r in 0..n {
                let got = &y[r * n_out..(r + 1) * n_out];
                let before = &y0[r * n_out..(r + 1) * n_out];
                if !rows.contains(&r) {
                    assert_eq!(got, before, "row {r} is not the adapter's");
                    continue;
                }
                let xr = &x[r * n_in..(r + 1) * n_in];
                let want = reference(&a, &b, xr, before, (rank, n_in, n_out), 0.75);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "row {r}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_plain_and_the_fused_code_agree_with_the_reference() {
        let (rank, n_in, n_out) = (5, 37, 23);
        let (a, b) = (values(rank * n_in, 5), values(n_out * rank, 6));
        let (x, y0) = (values(n_in, 7), values(n_out, 8));
        let lr = LowRank::new(a.clone(), &b, rank, n_in, n_out).unwrap();
        let want = reference(&a, &b, &x, &y0, (rank, n_in, n_out), -1.5);
        let mut plain = y0.clone();
        update::<false>(&lr.a, &lr.b_t, &x, &mut plain, -1.5);
        let mut fused = y0.clone();
        update::<true>(&lr.a, &lr.b_t, &x, &mut fused, -1.5);
        for ((p, f), w) in plain.iter().zip(&fused).zip(&want) {
            assert!((p - w).abs() <= 1e-4 * (1.0 + w.abs()), "{p} vs {w}");
            assert!((f - w).abs() <= 1e-4 * (1.0 + w.abs()), "{f} vs {w}");
        }
    }

    #[test]
    fn refuses_lengths_that_do_not_match_the_shape() {
        assert!(LowRank::new(vec![0.0; 8], &[0.0; 12], 2, 4, 6).is_some());
        assert!(LowRank::new(vec![0.0; 8], &[0.0; 11], 2, 4, 6).is_none());
        assert!(LowRank::new(vec![0.0; 7], &[0.0; 12], 2, 4, 6).is_none());
        assert!(LowRank::new(Vec::new(), &[], 0, 4, 6).is_none());
    }
}
