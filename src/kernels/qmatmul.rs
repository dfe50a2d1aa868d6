//! Quantized matrix products `y = x · Wᵀ` for Q4_0, Q4_1 and Q8_0 weights: activations are
//! quantized once per call, then each weight row is applied to every input row while it is
//! in cache, in parallel over weight rows (the compute pool). Other quantization types run on candle.
//!
//! Invariant: results match [`super::quant`]'s llama.cpp-exact block dot products; the
//! thread split never changes a result (each output is computed by one thread, in order).

use super::cpu::{self, simd_available, transpose_rows};
use super::pool;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

use super::kpack::KPacked;
use super::kquant::{self, KKind, KMatrix, QK_K};
use super::qtile::{self, QTiles};
pub use super::quant::WeightKind;
use super::quant::{self, Q8Row, UnpackedRow, QK};

/// A weight matrix `[rows, cols]`: GGML blocks, or for Q4_1 and Q8_0 on CPUs with AVX-512
/// VNNI, 16-row tiles ([`QTiles`]).
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub kind: WeightKind,
    storage: Storage,
}

enum Storage {
    Blocks(Vec<u8>),
    QTiles(QTiles),
}

/// Weight rows handed to one parallel task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

impl QMatrix {
    /// `data`: GGML blocks, row-major. Q4_1 and Q8_0 go into tiles where the CPU has their
    /// kernel.
    pub fn new(kind: WeightKind, rows: usize, cols: usize, data: &[u8]) -> Self {
        assert_eq!(
            data.len(),
            rows * cols / QK * kind.block_bytes(),
            "weight data length"
        );
        let storage = if QTiles::supports(kind, rows, cols) && qtile::tiled_here() {
            Storage::QTiles(QTiles::pack(kind, rows, cols, data))
        } else {
            Storage::Blocks(data.to_vec())
        };
        Self {
            rows,
            cols,
            kind,
            storage,
        }
    }

    /// Row `r`'s GGML blocks (rebuilt into `buf` when the matrix is tiled).
    pub fn row_in<'a>(&'a self, r: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        match &self.storage {
            Storage::Blocks(data) => {
                let bytes = self.cols / QK * self.kind.block_bytes();
                &data[r * bytes..(r + 1) * bytes]
            }
            Storage::QTiles(t) => t.row_into(r, buf),
        }
    }

    fn tiles(&self) -> Option<&QTiles> {
        match &self.storage {
            Storage::QTiles(t) => Some(t),
            Storage::Blocks(_) => None,
        }
    }

    /// True when the matrix is stored in tiles.
    pub fn tiled(&self) -> bool {
        self.tiles().is_some()
    }

    /// `x`: `[n, cols]` row-major. Returns `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_q8(Activations::new(x, n).q8())
    }

    fn matmul_q8(&self, q8: &Q8Acts) -> Vec<f32> {
        debug_assert!(q8.rows.iter().all(|a| a.qs.len() == self.cols));
        if let Storage::QTiles(t) = &self.storage {
            if qtile::simd_available() {
                return matmul_tiles(t, &q8.rows);
            }
        }
        matmul_rows_many(&[self], q8).pop().expect("one product")
    }
}

/// The products of matrices kept in rows (no tile kernel here) with the same activations, in
/// one parallel loop over all their rows, `ROWS_PER_TASK` a unit, claimed guided. Returns one
/// `[n, rows]` per matrix.
fn matmul_rows_many(ms: &[&QMatrix], q8: &Q8Acts) -> Vec<Vec<f32>> {
    struct Dst(*mut f32);
    // Safety: units write disjoint outputs (their rows' `n` values each).
    unsafe impl Sync for Dst {}
    let n = q8.rows.len();
    if n == 0 {
        return ms.iter().map(|_| Vec::new()).collect();
    }
    // Weight-row-major results: [rows, n].
    let mut by_row: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; m.rows * n]).collect();
    let dsts: Vec<Dst> = by_row.iter_mut().map(|o| Dst(o.as_mut_ptr())).collect();
    // (matrix, first row) pairs, matrix by matrix.
    let units: Vec<(usize, usize)> = ms
        .iter()
        .enumerate()
        .flat_map(|(i, m)| (0..m.rows).step_by(ROWS_PER_TASK).map(move |r| (i, r)))
        .collect();
    let simd = simd_available();
    pool::for_ranges_guided(units.len(), 1, |range| {
        for &(i, first) in &units[range] {
            let (m, dst) = (ms[i], &dsts[i]);
            let rows = ROWS_PER_TASK.min(m.rows - first);
            // Safety: rows `first..first + rows` of matrix `i` are this unit's alone.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.0.add(first * n), rows * n) };
            rows_task(m, first, out, q8, simd);
        }
    });
    by_row
        .into_iter()
        .zip(ms)
        .map(|(b, m)| transpose_rows(b, m.rows, n))
        .collect()
}

/// Rows `first..` of `m` (as many as `out` holds) against every input row.
fn rows_task(m: &QMatrix, first: usize, out: &mut [f32], q8: &Q8Acts, simd: bool) {
    let acts = &q8.rows[..];
    #[cfg(target_arch = "x86_64")]
    if simd {
        // Safety: `simd_available()` checked the CPU features.
        unsafe {
            if acts.len() >= 4 {
                rows_x86_multi(m, first, out, acts, &q8.quads)
            } else {
                rows_x86(m, first, out, acts)
            }
        };
        return;
    }
    let _ = simd;
    rows_portable(m, first, out, acts)
}

/// `[n, rows]` from tiles, in parallel over tiles, two input rows per pass.
fn matmul_tiles(t: &QTiles, acts: &[Q8Row]) -> Vec<f32> {
    matmul_tiles_many(&[t], acts).pop().expect("one product")
}

/// The products of several tiled matrices with the same activations (q, k, v; gate, up) in
/// one parallel loop over all their tiles. Returns one `[n, rows]` per matrix.
fn matmul_tiles_many(ts: &[&QTiles], acts: &[Q8Row]) -> Vec<Vec<f32>> {
    struct Dst(*mut f32);
    // Safety: tasks write disjoint outputs (one tile's 16 per input row).
    unsafe impl Sync for Dst {}
    let n = acts.len();
    // Exactly as wide as the weights: an odd Q8_0 tile has room for one block more (its last
    // pair's unused half), which the kernel's length check alone would let through.
    assert!(
        ts.iter()
            .all(|t| acts.iter().all(|a| a.d.len() * QK == t.cols())),
        "activation width"
    );
    let mut outs: Vec<Vec<f32>> = ts.iter().map(|t| vec![0f32; n * t.rows()]).collect();
    let dsts: Vec<Dst> = outs.iter_mut().map(|o| Dst(o.as_mut_ptr())).collect();
    // (matrix, tile) pairs, matrix by matrix.
    let units: Vec<(usize, usize)> = ts
        .iter()
        .enumerate()
        .flat_map(|(i, t)| (0..t.rows() / qtile::TILE).map(move |tile| (i, tile)))
        .collect();
    let min_tiles = ts
        .iter()
        .map(|t| (48 * 1024 / t.tile(0).len()).max(1))
        .min()
        .unwrap_or(1);
    pool::for_ranges_guided(units.len(), min_tiles, |range| {
        for &(i, tile) in &units[range] {
            let (t, dst, rows) = (ts[i], &dsts[i], ts[i].rows());
            for (g, pair) in acts.chunks(2).enumerate() {
                // Safety: each (matrix, tile, input row) owns its 16 outputs.
                let outs: [*mut f32; 2] = std::array::from_fn(|j| unsafe {
                    dst.0
                        .add((2 * g + j.min(pair.len() - 1)) * rows + tile * qtile::TILE)
                });
                let ran = qtile::run_tile(t, tile, pair, &outs[..pair.len()], g == 0);
                debug_assert!(ran);
            }
        }
    });
    outs
}

/// Activations quantized to Q8 (32-value blocks), with the four-row scale groups the SIMD
/// kernels use.
pub struct Q8Acts {
    rows: Vec<Q8Row>,
    #[cfg(target_arch = "x86_64")]
    quads: Vec<super::x86::Quad>,
}

/// Input rows `[n, cols]` of one or more matrix products, quantized on first use in each form
/// the weights ask for, so layers reading the same input (q, k, v; gate, up) share the work.
pub struct Activations<'a> {
    x: &'a [f32],
    n: usize,
    q8: std::cell::OnceCell<Q8Acts>,
    q8k: std::cell::OnceCell<Vec<kquant::Q8KRow>>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32], n: usize) -> Self {
        debug_assert!(n == 0 || x.len().is_multiple_of(n));
        Self {
            x,
            n,
            q8: std::cell::OnceCell::new(),
            q8k: std::cell::OnceCell::new(),
        }
    }

    fn q8(&self) -> &Q8Acts {
        self.q8.get_or_init(|| {
            let rows = cpu::map_rows(self.x, self.n, quant::quantize_row);
            #[cfg(target_arch = "x86_64")]
            let quads = if simd_available() {
                rows.chunks_exact(4)
                    .map(|a| super::x86::Quad::new([&a[0], &a[1], &a[2], &a[3]]))
                    .collect()
            } else {
                Vec::new()
            };
            Q8Acts {
                rows,
                #[cfg(target_arch = "x86_64")]
                quads,
            }
        })
    }

    pub(crate) fn q8k(&self) -> &[kquant::Q8KRow] {
        self.q8k
            .get_or_init(|| cpu::map_rows(self.x, self.n, kquant::quantize_row_q8k))
    }
}

/// Computes `out` (`[rows_in_task, n]`) for the weight rows starting at `first`: each weight
/// row is unpacked once and applied to every input row.
#[inline(always)]
fn rows_portable(m: &QMatrix, first: usize, out: &mut [f32], acts: &[Q8Row]) {
    let (mut w, mut buf) = (UnpackedRow::default(), Vec::new());
    for (local, out_row) in out.chunks_exact_mut(acts.len()).enumerate() {
        quant::unpack_row(m.kind, m.row_in(first + local, &mut buf), &mut w);
        for (o, a) in out_row.iter_mut().zip(acts) {
            *o = quant::dot(&w, a);
        }
    }
}

/// The AVX2 kernels: each weight row is applied to every input row straight from its
/// quantized blocks (it stays in L1 meanwhile), four weight rows at a time
/// ([`super::x86::dot_rows4`]). Bit-identical to [`rows_portable`].
///
/// # Safety
/// The CPU must support what [`super::x86::available`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_x86(m: &QMatrix, first: usize, out: &mut [f32], acts: &[Q8Row]) {
    use super::x86;
    let n = acts.len();
    let rows = out.len() / n;
    let fours = rows / 4 * 4;
    let mut bufs: [Vec<u8>; 4] = Default::default();
    for (i, out4) in out[..fours * n].chunks_exact_mut(4 * n).enumerate() {
        let [b0, b1, b2, b3] = &mut bufs;
        let r = first + 4 * i;
        let w = [
            m.row_in(r, b0),
            m.row_in(r + 1, b1),
            m.row_in(r + 2, b2),
            m.row_in(r + 3, b3),
        ];
        for (j, a) in acts.iter().enumerate() {
            let got = x86::dot_rows4(m.kind, w, a);
            for (k, v) in got.into_iter().enumerate() {
                out4[k * n + j] = v;
            }
        }
    }
    // One loop per weight type, so the type is not re-examined per dot product.
    let (first, out) = (first + fours, &mut out[fours * n..]);
    match m.kind {
        WeightKind::Q4_0 => rows_x86_with(m, first, out, acts, |w, a| x86::dot_q4_0(w, a)),
        WeightKind::Q4_1 => rows_x86_with(m, first, out, acts, |w, a| x86::dot_q4_1(w, a)),
        WeightKind::Q8_0 => rows_x86_with(m, first, out, acts, |w, a| x86::dot_q8_0(w, a)),
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_x86_with(
    m: &QMatrix,
    first: usize,
    out: &mut [f32],
    acts: &[Q8Row],
    dot: impl Fn(&[u8], &Q8Row) -> f32,
) {
    let mut buf = Vec::new();
    for (local, out_row) in out.chunks_exact_mut(acts.len()).enumerate() {
        let w = m.row_in(first + local, &mut buf);
        for (o, a) in out_row.iter_mut().zip(acts) {
            *o = dot(w, a);
        }
    }
}

/// Several input rows: four at a time share each expanded weight block
/// ([`super::x86::dot4_quad`], or its VNNI twin), the rest go one by one. A separate function from [`rows_x86`] so
/// the decode loop's code stays as tight as it is alone (measured: 250 vs 150 tok/s).
///
/// # Safety
/// As [`rows_x86`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_x86_multi(
    m: &QMatrix,
    first: usize,
    out: &mut [f32],
    acts: &[Q8Row],
    quads: &[super::x86::Quad],
) {
    let n = acts.len();
    let quads_len = n / 4 * 4;
    let nb = m.cols / QK;
    let (mut dw, mut mw) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
    let vnni = super::x86::vnni_available();
    let mut buf = Vec::new();
    for (local, out_row) in out.chunks_exact_mut(n).enumerate() {
        let w = m.row_in(first + local, &mut buf);
        super::x86::row_scales(m.kind, w, nb, &mut dw, &mut mw);
        for ((o, a), quad) in out_row[..quads_len]
            .chunks_exact_mut(4)
            .zip(acts.chunks_exact(4))
            .zip(quads)
        {
            let four = [&a[0], &a[1], &a[2], &a[3]];
            // Safety: `vnni_available` checked the VNNI kernel's extra features.
            let r = if vnni {
                super::x86::dot4_quad_vnni(m.kind, w, &dw, &mw, four, quad)
            } else {
                super::x86::dot4_quad(m.kind, w, &dw, &mw, four, quad)
            };
            o.copy_from_slice(&r);
        }
        for (o, a) in out_row[quads_len..].iter_mut().zip(&acts[quads_len..]) {
            *o = match m.kind {
                WeightKind::Q4_0 => super::x86::dot_q4_0(w, a),
                WeightKind::Q4_1 => super::x86::dot_q4_1(w, a),
                WeightKind::Q8_0 => super::x86::dot_q8_0(w, a),
            };
        }
    }
}

/// True when this CPU runs one of the repacked K-quant kernels (AVX-512 VNNI, else AVX2). The
/// layout is chosen by hardware, so `EDGEINFER_NO_SIMD` / `EDGEINFER_NO_AVX512` run the same
/// tiles through the portable / AVX2 code and give the same results. `EDGEINFER_NO_KPACK=1`
/// keeps candle's tile kernels instead (for side-by-side benchmarks).
pub(crate) fn packed_preferred() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !super::env_flag("EDGEINFER_NO_KPACK") && super::x86::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A linear layer: our kernels where we have them, candle's otherwise.
pub enum Linear {
    Native(QMatrix),
    NativeK(KMatrix),
    Packed(KPacked),
    Candle(QMatMul),
}

impl Linear {
    /// The fastest kernel measured for `t`'s type (`cargo bench --bench main -- qmatmul/`):
    /// ours; for Q4_K and Q6_K our repacked tiles ([`KPacked`]) on x86 CPUs with AVX2, else
    /// candle's repacked tile kernels, which beat our unpack-then-dot ones 3-4x.
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        Self::from_bytes(t.dtype(), t.shape().dims(), &t.data()?)
    }

    /// [`from_qtensor`](Self::from_qtensor) over a tensor's GGML blocks as they lie in the
    /// file (a memory map): packed from there, with no copy of the file in between.
    pub fn from_bytes(dtype: GgmlDType, dims: &[usize], data: &[u8]) -> candle_core::Result<Self> {
        let k_kind = match dtype {
            GgmlDType::Q4K => Some(KKind::Q4K),
            GgmlDType::Q6K => Some(KKind::Q6K),
            _ => None,
        };
        match (k_kind, dims) {
            (Some(kind), &[rows, cols])
                if packed_preferred() && KPacked::supports(kind, rows, cols) =>
            {
                Ok(Self::Packed(KPacked::pack(kind, rows, cols, data)))
            }
            (Some(_), _) => Self::candle(dtype, dims, data),
            (None, _) => Self::native_bytes(dtype, dims, data),
        }
    }

    /// Our kernels wherever we have one for `t`'s type and width, candle's otherwise.
    pub fn from_qtensor_native(t: &QTensor) -> candle_core::Result<Self> {
        Self::native_bytes(t.dtype(), t.shape().dims(), &t.data()?)
    }

    fn native_bytes(dtype: GgmlDType, dims: &[usize], data: &[u8]) -> candle_core::Result<Self> {
        let k_kind = match dtype {
            GgmlDType::Q4K => Some(KKind::Q4K),
            GgmlDType::Q5K => Some(KKind::Q5K),
            GgmlDType::Q6K => Some(KKind::Q6K),
            _ => None,
        };
        if let (Some(kind), &[rows, cols]) = (k_kind, dims) {
            if cols % QK_K == 0 {
                return Ok(Self::NativeK(KMatrix {
                    rows,
                    cols,
                    kind,
                    data: data.to_vec(),
                }));
            }
        }
        match (WeightKind::from_dtype(dtype), dims) {
            (Some(kind), &[rows, cols]) if cols % QK == 0 => {
                Ok(Self::Native(QMatrix::new(kind, rows, cols, data)))
            }
            _ => Self::candle(dtype, dims, data),
        }
    }

    fn candle(dtype: GgmlDType, dims: &[usize], data: &[u8]) -> candle_core::Result<Self> {
        // Copied: candle casts the bytes to its block type, and a mapped tensor's offset in
        // the file need not suit that type's alignment.
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(data.to_vec()),
            &candle_core::Device::Cpu,
            dtype,
        )?;
        let copy = QTensor::new(storage, dims)?;
        Ok(Self::Candle(QMatMul::from_qtensor(copy)?))
    }

    /// The rows `ids`, dequantized: `[ids.len(), cols]` (an embedding lookup). Ids must be
    /// below the row count (the model checks them against its vocabulary).
    pub fn embedding(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Native(m) => {
                let (mut out, mut buf) = (Vec::with_capacity(ids.len() * m.cols), Vec::new());
                for &id in ids {
                    quant::dequantize_row(m.kind, m.row_in(id as usize, &mut buf), &mut out);
                }
                Ok(out)
            }
            Self::NativeK(m) => {
                let mut out = Vec::with_capacity(ids.len() * m.cols);
                for &id in ids {
                    kquant::dequantize_row(m.kind, m.row(id as usize), &mut out);
                }
                Ok(out)
            }
            Self::Packed(m) => {
                let mut out = Vec::with_capacity(ids.len() * m.cols);
                for &id in ids {
                    m.dequantize_row(id as usize, &mut out);
                }
                Ok(out)
            }
            Self::Candle(m) => {
                let ids = Tensor::new(ids, &candle_core::Device::Cpu)?;
                m.embedding(&ids)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()
            }
        }
    }

    /// `x`: `[n, cols]` row-major f32 -> `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        self.apply(&Activations::new(x, n))
    }

    /// The product with (possibly already quantized) activations: `[n, rows]`.
    pub fn apply(&self, a: &Activations) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Native(m) => Ok(m.matmul_q8(a.q8())),
            Self::NativeK(m) => Ok(m.matmul_q8k(a.q8k())),
            Self::Packed(m) => Ok(m.matmul_q8k(a.q8k())),
            Self::Candle(m) => {
                let cols = a.x.len() / a.n.max(1);
                let x = Tensor::from_slice(a.x, (a.n, cols), &candle_core::Device::Cpu)?;
                m.forward(&x)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }

    /// The products of several layers reading the same activations (q, k, v; gate, up): one
    /// parallel loop when all are repacked K-quant tiles, all Q4_1 / Q8_0 tiles, or all our
    /// row kernels' (Q4_0, Q4_1, Q8_0 in rows), one per layer otherwise.
    pub fn apply_many(layers: &[&Linear], a: &Activations) -> candle_core::Result<Vec<Vec<f32>>> {
        let packed: Option<Vec<&KPacked>> = layers
            .iter()
            .map(|l| match l {
                Self::Packed(m) => Some(m),
                _ => None,
            })
            .collect();
        if let Some(ms) = packed.filter(|ms| ms.len() > 1) {
            return Ok(KPacked::matmul_many(&ms, a.q8k()));
        }
        let tiled: Option<Vec<&QTiles>> = layers
            .iter()
            .map(|l| match l {
                Self::Native(m) => m.tiles(),
                _ => None,
            })
            .collect();
        match tiled {
            Some(ts) if ts.len() > 1 && qtile::simd_available() => {
                return Ok(matmul_tiles_many(&ts, &a.q8().rows));
            }
            _ => {}
        }
        let rows: Option<Vec<&QMatrix>> = layers
            .iter()
            .map(|l| match l {
                Self::Native(m) if !m.tiled() => Some(m),
                _ => None,
            })
            .collect();
        match rows {
            Some(ms) if ms.len() > 1 => Ok(matmul_rows_many(&ms, a.q8())),
            _ => layers.iter().map(|l| l.apply(a)).collect(),
        }
    }

    /// `x`: `[n, cols]` f32 -> `[n, rows]` f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = match self {
            Self::Native(m) => m.rows,
            Self::NativeK(m) => m.rows,
            Self::Packed(m) => m.rows,
            Self::Candle(m) => return m.forward(x),
        };
        let n = x.dim(0)?;
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        Tensor::from_vec(self.matmul(&data, n)?, (n, rows), x.device())
    }
}

#[cfg(test)]
#[path = "qmatmul_tests.rs"]
mod tests;
