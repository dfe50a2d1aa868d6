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
        let one = |r: usize, out: &mut [f32]| {
            let xr = &x[r * n_in..(r + 1) * n_in];
            for (k, a) in self.a.chunks_exact(n_in).enumerate() {
                let t = scale * dot(a, xr);
                let b = &self.b_t[k * n_out..(k + 1) * n_out];
                for (o, &bv) in out.iter_mut().zip(b) {
                    *o += t * bv;
                }
            }
        };
        let work = rows.len() * self.rank * (n_in + n_out);
        if rows.len() > 1 && work >= PARALLEL_QUANT_VALUES * 16 {
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

/// A dot product in eight lanes (vectorised; the sum's order is fixed, so a row's result
/// does not depend on the rows beside it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
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
    fn refuses_lengths_that_do_not_match_the_shape() {
        assert!(LowRank::new(vec![0.0; 8], &[0.0; 12], 2, 4, 6).is_some());
        assert!(LowRank::new(vec![0.0; 8], &[0.0; 11], 2, 4, 6).is_none());
        assert!(LowRank::new(vec![0.0; 7], &[0.0; 12], 2, 4, 6).is_none());
        assert!(LowRank::new(Vec::new(), &[], 0, 4, 6).is_none());
    }
}
