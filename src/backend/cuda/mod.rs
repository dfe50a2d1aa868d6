//! The CUDA backend (`--features cuda`, `--device cuda[:N]`): candle's CUDA quantized matmuls
//! (MMVQ for up to 8 rows, MMQ beyond; Q4_0..Q8_0 and Q2_K..Q6_K), candle's RMS norm and
//! elementwise ops, and our own kernels (`kernels.cu`) for RoPE, the paged f16 KV pool and
//! paged attention over block tables. Token embeddings stay on the host, quantized, and only
//! the step's rows go up; logits come back only for the rows that asked.
//!
//! The scheduler, block manager, prefix cache and sampler are the CPU's, unchanged: this
//! backend only does a step's arithmetic.

use std::sync::Arc;

use candle_core::cuda::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use candle_core::op::BackpropOp;
use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Module, Storage, Tensor};
use half::f16;

use super::{Backend, HeadShape, LoraShape, Result, StepPlan, WeightUse};
use crate::error::ModelError;
use crate::kernels::qmatmul::Linear;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/edgeinfer_kernels.ptx"));
const MAX_HEAD_DIM: usize = 256;
const THREADS: u32 = 256;

/// Launches our kernel `$name` with `$cfg` and the arguments its signature in kernels.cu
/// names, in order.
macro_rules! launch {
    ($self:ident, $name:ident, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let mut b = $self.stream.launch_builder(&$self.kernels.$name);
        $( b.arg($arg); )*
        // SAFETY: every call passes the arguments the kernel's signature names, with buffers
        // at least as long as the sizes it passes.
        unsafe { b.launch($cfg) }.map_err(driver).map(|_| ())
    }};
}

/// Our kernels, looked up once.
struct Kernels {
    rope_f32: CudaFunction,
    kv_write_f32: CudaFunction,
    kv_copy: CudaFunction,
    paged_attention_f32: CudaFunction,
}

/// One NVIDIA GPU.
///
/// candle gives each thread its own stream (`per_thread_stream`), and the model is loaded on
/// one thread and run on the engine thread: whatever the loading thread queues (weights,
/// the zeroed KV pool) is waited for before the store is handed over ([`Backend::alloc_kv`]
/// and [`Backend::grow_kv`] synchronize). Within a step every op runs on the engine
/// thread's stream, in order.
pub struct Cuda {
    device: Device,
    dev: CudaDevice,
    /// The per-thread stream handle: launches go to the calling thread's stream.
    stream: Arc<CudaStream>,
    kernels: Kernels,
    ordinal: usize,
}

impl Cuda {
    /// Opens GPU `ordinal` and loads our kernels (a driver too old for their PTX fails here).
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = Device::new_cuda(ordinal)?;
        let dev = device.as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        let module = stream.context().load_module(PTX.into()).map_err(driver)?;
        let f = |name: &str| module.load_function(name).map_err(driver);
        let kernels = Kernels {
            rope_f32: f("rope_f32")?,
            kv_write_f32: f("kv_write_f32")?,
            kv_copy: f("kv_copy")?,
            paged_attention_f32: f("paged_attention_f32")?,
        };
        Ok(Self {
            device,
            dev,
            stream,
            kernels,
            ordinal,
        })
    }

    /// The candle device (for reading tensors onto the GPU).
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn wrap(&self, s: CudaSlice<f32>, rows: usize, cols: usize) -> Tensor {
        let st = CudaStorage::wrap_cuda_slice(s, self.dev.clone());
        Tensor::from_storage(Storage::Cuda(st), (rows, cols), BackpropOp::none(), false)
    }

    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        let v = if v.is_empty() { &[0][..] } else { v };
        Ok(self.dev.clone_htod(v)?)
    }
}

fn driver(e: DriverError) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("CUDA: {e}")))
}

fn grid(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Runs `f` on the f32 device buffer behind a contiguous tensor.
fn with_f32<T>(t: &Tensor, f: impl FnOnce(&CudaSlice<f32>, usize) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (st, layout) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(s) => f(s.as_cuda_slice::<f32>()?, layout.start_offset()),
        _ => Err(ModelError::Candle(candle_core::Error::Msg(
            "a CUDA op got a tensor that is not on the GPU. This is a bug.".into(),
        ))),
    }
}

/// A weight as the GPU backend holds it: quantized on the GPU for matmuls, quantized on the
/// host for embedding lookups, or both.
pub struct CudaWeight {
    mm: Option<QMatMul>,
    host: Option<Linear>,
}

/// The paged KV pool in GPU memory: per layer, K and V of `n_blocks * block_size * stride` f16.
pub struct CudaKv {
    layers: Vec<(CudaSlice<f16>, CudaSlice<f16>)>,
    block_size: usize,
    n_blocks: usize,
    stride: usize,
}

/// One step's shared data, uploaded once.
pub struct CudaStep {
    rows: usize,
    rope: CudaSlice<f32>,
    slots: CudaSlice<i32>,
    row_pos: CudaSlice<i32>,
    row_table: CudaSlice<i32>,
    tables: CudaSlice<i32>,
}

impl Backend for Cuda {
    type Act = Tensor;
    type Weight = CudaWeight;
    type Norm = Tensor;
    type Kv = CudaKv;
    type Step = CudaStep;
    /// LoRA adapters run on the CPU backend only (for now): none is ever loaded here.
    type Lora = std::convert::Infallible;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn load_weight(&self, t: &QTensor, usage: WeightUse) -> Result<CudaWeight> {
        let mm = if usage == WeightUse::Embedding {
            None
        } else {
            let data = t.data()?;
            let storage = QStorage::from_data(data, &self.device, t.dtype())?;
            Some(QMatMul::from_qtensor(QTensor::new(storage, t.shape())?)?)
        };
        let host = if usage == WeightUse::Matmul {
            None
        } else {
            Some(Linear::from_qtensor(t)?)
        };
        Ok(CudaWeight { mm, host })
    }

    fn load_norm(&self, w: Vec<f32>) -> Result<Tensor> {
        let n = w.len();
        Ok(Tensor::from_vec(w, n, &self.device)?)
    }

    fn load_lora(&self, _a: Vec<f32>, _b: Vec<f32>, _shape: LoraShape) -> Result<Self::Lora> {
        Err(ModelError::Candle(candle_core::Error::Msg(
            "LoRA adapters run on the CPU backend only: serve them with --device cpu".into(),
        )))
    }

    fn lora_add(
        &self,
        _y: &mut Tensor,
        _x: &Tensor,
        lora: &Self::Lora,
        _rows: &[usize],
        _scale: f32,
    ) -> Result<()> {
        match *lora {}
    }

    fn alloc_kv(
        &self,
        n_layer: usize,
        stride: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Result<CudaKv> {
        let len = (n_blocks * block_size * stride).max(1);
        let layers = (0..n_layer)
            .map(|_| Ok((self.dev.alloc_zeros(len)?, self.dev.alloc_zeros(len)?)))
            .collect::<Result<_>>()?;
        // The zeroing (and the weights' uploads before it) ran on this thread's stream; the
        // engine thread's stream must not overtake them.
        self.device.synchronize()?;
        Ok(CudaKv {
            layers,
            block_size,
            n_blocks,
            stride,
        })
    }

    fn grow_kv(&self, kv: &mut CudaKv, extra: usize) -> Result<()> {
        let mut bigger = self.alloc_kv(
            kv.layers.len(),
            kv.stride,
            kv.block_size,
            kv.n_blocks + extra,
        )?;
        let used = kv.n_blocks * kv.block_size * kv.stride;
        if used > 0 {
            for ((k, v), (nk, nv)) in kv.layers.iter().zip(&mut bigger.layers) {
                self.dev
                    .memcpy_dtod(&k.slice(..used), &mut nk.slice_mut(..used))?;
                self.dev
                    .memcpy_dtod(&v.slice(..used), &mut nv.slice_mut(..used))?;
            }
        }
        *kv = bigger;
        self.device.synchronize()?;
        Ok(())
    }

    fn kv_blocks(&self, kv: &CudaKv) -> usize {
        kv.n_blocks
    }

    fn copy_kv(&self, kv: &mut CudaKv, src: u32, dst: u32, rows: usize) -> Result<()> {
        if rows > kv.block_size || src as usize >= kv.n_blocks || dst as usize >= kv.n_blocks {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "block copy out of range. This is a bug.".into(),
            )));
        }
        let at = |b: u32| (b as usize * kv.block_size * kv.stride) as i64;
        let (from, to, len) = (at(src), at(dst), (rows * kv.stride) as i64);
        for (k, v) in &mut kv.layers {
            launch!(self, kv_copy, grid(len as usize), [k, v, &from, &to, &len])?;
        }
        Ok(())
    }

    fn begin_step(&self, kv: &CudaKv, plan: StepPlan) -> Result<CudaStep> {
        let rope: Vec<f32> = plan.rope.iter().flat_map(|&(c, s)| [c, s]).collect();
        let (mut slots, mut row_pos, mut row_table, mut tables) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in &plan.seqs {
            let offset = tables.len() as i32;
            tables.extend(s.blocks.iter().map(|&b| b as i32));
            for p in s.start..s.start + s.len {
                let block = s.blocks[p / kv.block_size] as usize;
                slots.push((block * kv.block_size + p % kv.block_size) as i32);
                row_pos.push(p as i32);
                row_table.push(offset);
            }
        }
        Ok(CudaStep {
            rows: plan.rows,
            rope: self.dev.clone_htod(&rope)?,
            slots: self.upload_i32(&slots)?,
            row_pos: self.upload_i32(&row_pos)?,
            row_table: self.upload_i32(&row_table)?,
            tables: self.upload_i32(&tables)?,
        })
    }

    fn embed(&self, table: &CudaWeight, tokens: &[u32]) -> Result<Tensor> {
        let host = table.host.as_ref().ok_or_else(|| {
            ModelError::Candle(candle_core::Error::Msg(
                "the embedding table was not kept on the host. This is a bug.".into(),
            ))
        })?;
        let rows = host.embedding(tokens)?;
        let dim = rows.len() / tokens.len().max(1);
        Ok(Tensor::from_vec(rows, (tokens.len(), dim), &self.device)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
    }

    fn matmul_many(&self, ws: &[&CudaWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        ws.iter().map(|w| self.matmul(w, x)).collect()
    }

    fn matmul(&self, w: &CudaWeight, x: &Tensor) -> Result<Tensor> {
        let mm = w.mm.as_ref().ok_or_else(|| {
            ModelError::Candle(candle_core::Error::Msg(
                "a weight loaded for embedding only was multiplied. This is a bug.".into(),
            ))
        })?;
        Ok(mm.forward(x)?)
    }

    fn rope(&self, x: &mut Tensor, step: &CudaStep, head_dim: usize) -> Result<()> {
        let (rows, width) = x.dims2()?;
        let heads = width / head_dim;
        let mut out = self.dev.alloc_zeros::<f32>(rows * width)?;
        with_f32(x, |xs, off| {
            let xs = xs.slice(off..);
            let (r, h, d) = (rows as i32, heads as i32, head_dim as i32);
            launch!(
                self,
                rope_f32,
                grid(rows * width / 2),
                [&xs, &mut out, &step.rope, &r, &h, &d]
            )
        })?;
        *x = self.wrap(out, rows, width);
        Ok(())
    }

    fn kv_write(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        step: &CudaStep,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let stride = kv.stride as i32;
        let rows = step.rows as i32;
        let cfg = grid(step.rows * kv.stride);
        let (kc, vc) = &mut kv.layers[layer];
        with_f32(k, |ks, koff| {
            with_f32(v, |vs, voff| {
                let (ks, vs) = (ks.slice(koff..), vs.slice(voff..));
                launch!(
                    self,
                    kv_write_f32,
                    cfg,
                    [&ks, &vs, kc, vc, &step.slots, &rows, &stride]
                )
            })
        })
    }

    fn attention(
        &self,
        q: &Tensor,
        kv: &CudaKv,
        layer: usize,
        step: &CudaStep,
        shape: HeadShape,
    ) -> Result<Tensor> {
        if shape.head_dim > MAX_HEAD_DIM || !shape.n_head.is_multiple_of(shape.n_kv_head) {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "the CUDA attention kernel takes head_dim <= {MAX_HEAD_DIM} and n_head a \
                 multiple of n_kv_head; this model has {} and {}/{}",
                shape.head_dim, shape.n_head, shape.n_kv_head
            ))));
        }
        let width = shape.n_head * shape.head_dim;
        let mut out = self.dev.alloc_zeros::<f32>(step.rows * width)?;
        let (kc, vc) = &kv.layers[layer];
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let ints = [shape.n_head, shape.n_kv_head, shape.head_dim, kv.block_size].map(|v| v as i32);
        let cfg = LaunchConfig {
            grid_dim: (step.rows as u32, shape.n_head as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        with_f32(q, |qs, off| {
            let qs = qs.slice(off..);
            launch!(
                self,
                paged_attention_f32,
                cfg,
                [
                    &qs,
                    kc,
                    vc,
                    &mut out,
                    &step.row_pos,
                    &step.row_table,
                    &step.tables,
                    &ints[0],
                    &ints[1],
                    &ints[2],
                    &ints[3],
                    &scale,
                ]
            )
        })?;
        Ok(self.wrap(out, step.rows, width))
    }

    fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()> {
        *gate = gate.silu()?.mul(up)?;
        Ok(())
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        *x = x.add(y)?;
        Ok(())
    }

    fn select_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let ids = Tensor::from_vec(ids, rows.len(), &self.device)?;
        Ok(x.index_select(&ids, 0)?)
    }

    fn to_host(&self, x: Tensor) -> Result<Vec<f32>> {
        Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
