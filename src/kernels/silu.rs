//! SwiGLU's `silu(g) * u` over a row, with our own exponential: AVX-512 sixteen lanes at a
//! time where the CPU has it, the same operations in scalar code elsewhere, so both give the
//! same bits (every step is an IEEE operation or fused multiply-add done the same way).
//!
//! `exp(z)`: infinity above 88 (so `silu` is `-0` there, as with the library `exp`), `z`
//! raised to -87 below (the result stays a normal float; `silu` is `x` to f32 precision
//! there anyway), `n = round(z · log2 e)`, `r = z - n·ln 2` in two steps (Cody-Waite), `e^r`
//! by its degree-7 Taylor polynomial (|r| ≤ ln 2 / 2: truncation below 1e-8 relative), times
//! `2^n` built from its exponent bits. About one ulp from the correctly rounded value, as
//! llama.cpp's own vectorised SiLU is.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const Z_MIN: f32 = -87.0;
const Z_MAX: f32 = 88.0;
/// 1/7!, 1/6!, ..., 1/1!, 1/0!.
const C: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^z` (see the module notes), scalar.
#[inline(always)]
fn exp(z: f32) -> f32 {
    if z > Z_MAX {
        return f32::INFINITY;
    }
    let z = z.max(Z_MIN);
    let n = (z * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, z);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = C[0];
    for &c in &C[1..] {
        p = p.mul_add(r, c);
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `gate[i] = silu(gate[i]) * up[i]`, where `silu(x) = x / (1 + e^-x)`.
pub fn silu_mul_row(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    {
        if super::kpack::simd_available() {
            // Safety: `simd_available` checked AVX-512F and FMA.
            let done = unsafe { x86::silu_mul(gate, up) };
            return unsafe { x86::scalar_fma(&mut gate[done..], &up[done..]) };
        }
        if super::x86::available() {
            // Safety: `available` checked FMA.
            return unsafe { x86::scalar_fma(gate, up) };
        }
    }
    scalar(gate, up)
}

/// The scalar loop (the vector code's tail, or every value without AVX-512).
#[inline(always)]
fn scalar(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::scalar`] with `mul_add` as one instruction instead of a library call (the
    /// same correctly rounded result).
    ///
    /// # Safety
    /// The CPU must support FMA.
    #[target_feature(enable = "fma")]
    pub unsafe fn scalar_fma(gate: &mut [f32], up: &[f32]) {
        scalar(gate, up)
    }

    /// Sixteen lanes of [`super::exp`].
    #[inline(always)]
    unsafe fn exp16(z: __m512) -> __m512 {
        let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, _mm512_set1_ps(Z_MAX));
        let z = _mm512_min_ps(
            _mm512_max_ps(z, _mm512_set1_ps(Z_MIN)),
            _mm512_set1_ps(Z_MAX),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(z, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), z);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(C[0]);
        for &c in &C[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
        _mm512_mask_blend_ps(big, e, _mm512_set1_ps(f32::INFINITY))
    }

    /// The whole sixteens of `gate`; returns how many values it did.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and FMA; `up` is as long as `gate`.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) -> usize {
        let whole = gate.len() / 16 * 16;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm512_set1_ps(1.0);
        for i in (0..whole).step_by(16) {
            let x = _mm512_loadu_ps(g.add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
            _mm512_storeu_ps(g.add(i), _mm512_mul_ps(s, _mm512_loadu_ps(u.add(i))));
        }
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_the_library_one_over_silus_range() {
        let mut worst = 0f64;
        let mut z = -87.0f32;
        while z <= 88.0 {
            let (got, want) = (exp(z) as f64, (z as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            z += 0.001_3;
        }
        assert!(
            worst < 2.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(1000.0) == f32::INFINITY);
    }

    #[test]
    fn simd_and_scalar_give_the_same_bits() {
        let n = 16 * 40 + 7;
        let gate: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * 12.0 + if i == 5 { 200.0 } else { 0.0 })
            .chain([-200.0, 1e-30, -0.0, -3.0e38, 95.0])
            .collect();
        let up: Vec<f32> = (0..gate.len()).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut fast = gate.clone();
        silu_mul_row(&mut fast, &up);
        let scalar: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| g / (1.0 + exp(-g)) * u)
            .collect();
        for (i, (a, b)) in fast.iter().zip(&scalar).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "value {i}: {a} vs {b}");
        }
        // Against the library exponential: within a few ulps.
        for (i, (&g, &u)) in gate.iter().zip(&up).enumerate() {
            let want = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
            assert!(
                (fast[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "value {i}"
            );
        }
    }
}
