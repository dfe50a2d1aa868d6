//! RMS normalisation, computed as llama.cpp computes it (sum of squares in f64, scale
//! `1 / sqrt(mean + eps)` in f32, then the weight multiplied in a second pass).

/// Normalises each row of `x` (`[n, dim]`) in place and multiplies by `weight`.
/// Rows go in parallel when there are many.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    let norm = |row: &mut [f32]| {
        // f64 like llama.cpp's, in eight lanes so that it vectorises (a sequential sum waited
        // on each add; the order changes only bits far below an f32's).
        let mut lanes = [0f64; 8];
        let chunks = row.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| (v * v) as f64).sum();
        for c in chunks {
            for (s, &v) in lanes.iter_mut().zip(c) {
                *s += (v * v) as f64;
            }
        }
        let sum = lanes.iter().sum::<f64>() + tail;
        let mean = (sum / dim as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    };
    if x.len() >= super::cpu::PARALLEL_QUANT_VALUES {
        super::pool::for_chunks_mut(x, dim, |_, row| norm(row));
    } else {
        x.chunks_exact_mut(dim).for_each(norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_rms_after_norm() {
        let mut x = vec![3.0f32, -4.0, 0.0, 5.0, 1.0, 1.0, 1.0, 1.0];
        rms_norm(&mut x, &[1.0, 1.0, 1.0, 1.0], 0.0);
        for row in x.chunks(4) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-6, "{rms}");
        }
        let mut y = vec![2.0f32, 2.0];
        rms_norm(&mut y, &[0.5, 3.0], 0.0);
        assert_eq!(y, vec![0.5, 3.0]);
    }
}
