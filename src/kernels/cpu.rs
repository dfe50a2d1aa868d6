//! What every CPU kernel shares: the run-time SIMD choice, when work is worth the compute
//! pool, and the row-parallel helpers. A leaf: it uses only the pool and feature detection,
//! so the kernel files (32-blocks, K-quants, tiles, the dispatcher) never import each other
//! for these.

use super::pool;

/// Rows quantized (or outputs transposed) in parallel only when there is enough work to pay
/// for waking threads.
pub(crate) const PARALLEL_QUANT_VALUES: usize = 16 * 1024;

/// Run-time choice of kernels: AVX2 ones unless the CPU lacks them or `EDGEINFER_NO_SIMD`
/// is set.
pub(crate) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| super::x86::available() && !super::env_flag("EDGEINFER_NO_SIMD"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f` applied to each of the `n` rows of `x` (`[n, cols]`), into a fresh `T` per row; on
/// the pool when there is enough work.
pub(crate) fn map_rows<T: Send + Default>(
    x: &[f32],
    n: usize,
    f: impl Fn(&[f32], &mut T) + Sync,
) -> Vec<T> {
    let cols = x.len() / n.max(1);
    let mut out: Vec<T> = (0..n).map(|_| T::default()).collect();
    if x.len() >= PARALLEL_QUANT_VALUES {
        pool::for_chunks_mut(&mut out, 1, |i, q| f(&x[i * cols..][..cols], &mut q[0]));
    } else {
        out.iter_mut()
            .zip(x.chunks_exact(cols))
            .for_each(|(q, row)| f(row, q));
    }
    out
}

/// `[rows, n]` -> `[n, rows]`.
pub(crate) fn transpose_rows(by_row: Vec<f32>, rows: usize, n: usize) -> Vec<f32> {
    if n == 1 {
        return by_row;
    }
    let mut y = vec![0f32; n * rows];
    let column = |(i, out): (usize, &mut [f32])| {
        for (r, o) in out.iter_mut().enumerate() {
            *o = by_row[r * n + i];
        }
    };
    if n * rows >= PARALLEL_QUANT_VALUES {
        pool::for_chunks_mut(&mut y, rows, |i, out| column((i, out)));
    } else {
        y.chunks_mut(rows).enumerate().for_each(column);
    }
    y
}
