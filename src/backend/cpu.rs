//! The CPU backend: our kernels ([`crate::kernels`]) over host memory, with an f16
//! [`KvPool`]. Each op is the code the forward pass ran before the backend seam, moved here
//! unchanged, so outputs and speed stay as they were.

use candle_core::quantized::{GgmlDType, QTensor};

use super::{Backend, HeadShape, KvPool, LoraShape, Result, StepPlan, WeightUse};
use crate::kernels::attention::{packed_attention, AttentionSeq, AttentionShape};
use crate::kernels::cpu::PARALLEL_QUANT_VALUES;
use crate::kernels::lora::LowRank;
use crate::kernels::norm::rms_norm;
use crate::kernels::qmatmul::{Activations, Linear};
use crate::kernels::silu::silu_mul_row;

/// The host CPU, with the thread pool of [`crate::kernels::pool`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// A row-major `n × width` f32 matrix in host memory.
#[derive(Clone, Debug)]
pub struct Rows {
    pub data: Vec<f32>,
    pub n: usize,
}

impl Rows {
    fn width(&self) -> usize {
        self.data.len() / self.n.max(1)
    }
}

impl Backend for Cpu {
    type Act = Rows;
    type Weight = Linear;
    type Norm = Vec<f32>;
    type Kv = KvPool;
    type Step = StepPlan;
    type Lora = LowRank;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn load_weight(&self, t: &QTensor, _usage: WeightUse) -> Result<Linear> {
        Ok(Linear::from_qtensor(t)?)
    }

    fn load_weight_bytes(
        &self,
        bytes: &[u8],
        dtype: GgmlDType,
        dims: &[usize],
        _usage: WeightUse,
    ) -> Option<Result<Linear>> {
        Some(Linear::from_bytes(dtype, dims, bytes).map_err(Into::into))
    }

    fn load_norm(&self, w: Vec<f32>) -> Result<Vec<f32>> {
        Ok(w)
    }

    fn load_lora(&self, a: Vec<f32>, b: Vec<f32>, shape: LoraShape) -> Result<LowRank> {
        let LoraShape { rank, n_in, n_out } = shape;
        LowRank::new(a, &b, rank, n_in, n_out).ok_or_else(|| {
            candle_core::Error::Msg(format!("a LoRA pair is not {shape:?}. This is a bug.")).into()
        })
    }

    fn alloc_kv(
        &self,
        n_layer: usize,
        stride: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Result<KvPool> {
        KvPool::new(n_layer, stride, block_size, n_blocks)
            .map_err(|e| candle_core::Error::Msg(e).into())
    }

    fn grow_kv(&self, kv: &mut KvPool, extra: usize) -> Result<()> {
        kv.grow(extra)
            .map_err(|e| candle_core::Error::Msg(e).into())
    }

    fn kv_blocks(&self, kv: &KvPool) -> usize {
        kv.n_blocks()
    }

    fn copy_kv(&self, kv: &mut KvPool, src: u32, dst: u32, rows: usize) -> Result<()> {
        kv.copy_rows(src, dst, rows);
        Ok(())
    }

    fn begin_step(&self, _kv: &KvPool, plan: StepPlan) -> Result<StepPlan> {
        Ok(plan)
    }

    fn embed(&self, table: &Linear, tokens: &[u32]) -> Result<Rows> {
        Ok(Rows {
            data: table.embedding(tokens)?,
            n: tokens.len(),
        })
    }

    fn rms_norm(&self, x: &Rows, w: &Vec<f32>, eps: f32) -> Result<Rows> {
        let mut h = x.clone();
        rms_norm(&mut h.data, w, eps);
        Ok(h)
    }

    fn matmul_many(&self, ws: &[&Linear], x: &Rows) -> Result<Vec<Rows>> {
        // Quantized once for all of them (q, k and v; gate and up).
        let acts = Activations::new(&x.data, x.n);
        Ok(Linear::apply_many(ws, &acts)?
            .into_iter()
            .map(|data| Rows { data, n: x.n })
            .collect())
    }

    fn matmul(&self, w: &Linear, x: &Rows) -> Result<Rows> {
        Ok(Rows {
            data: w.matmul(&x.data, x.n)?,
            n: x.n,
        })
    }

    fn rope(&self, x: &mut Rows, step: &StepPlan, head_dim: usize) -> Result<()> {
        let half = head_dim / 2;
        let row_len = x.width();
        for (row, cos_sin) in x
            .data
            .chunks_exact_mut(row_len)
            .zip(step.rope.chunks_exact(half))
        {
            for head in row.chunks_exact_mut(head_dim) {
                for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cos_sin) {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * cos - x1 * sin;
                    pair[1] = x0 * sin + x1 * cos;
                }
            }
        }
        Ok(())
    }

    fn kv_write(
        &self,
        kv: &mut KvPool,
        layer: usize,
        step: &StepPlan,
        k: &Rows,
        v: &Rows,
    ) -> Result<()> {
        let kv_dim = k.width();
        for s in &step.seqs {
            for i in 0..s.len {
                let r = (s.row + i) * kv_dim;
                let (k, v) = (&k.data[r..r + kv_dim], &v.data[r..r + kv_dim]);
                kv.write(layer, &s.blocks, s.start + i, k, v);
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Rows,
        kv: &KvPool,
        layer: usize,
        step: &StepPlan,
        shape: HeadShape,
    ) -> Result<Rows> {
        let att: Vec<AttentionSeq> = step
            .seqs
            .iter()
            .map(|s| AttentionSeq {
                row: s.row,
                len: s.len,
                start: s.start,
                kv: kv.view(layer, &s.blocks),
            })
            .collect();
        let shape = AttentionShape {
            n_head: shape.n_head,
            n_kv_head: shape.n_kv_head,
            head_dim: shape.head_dim,
        };
        Ok(Rows {
            data: packed_attention(&q.data, &att, shape),
            n: q.n,
        })
    }

    fn silu_mul(&self, gate: &mut Rows, up: &Rows) -> Result<()> {
        let width = gate.width();
        let (gate, up) = (&mut gate.data, &up.data);
        let row = |(g, u): (&mut [f32], &[f32])| silu_mul_row(g, u);
        if gate.len() >= PARALLEL_QUANT_VALUES {
            crate::kernels::pool::for_chunks_mut(gate, width, |i, g| {
                row((g, &up[i * width..][..width]))
            });
        } else {
            gate.chunks_mut(width).zip(up.chunks(width)).for_each(row);
        }
        Ok(())
    }

    fn add(&self, x: &mut Rows, y: &Rows) -> Result<()> {
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn select_rows(&self, x: &Rows, rows: &[usize]) -> Result<Rows> {
        let w = x.width();
        let mut data = Vec::with_capacity(rows.len() * w);
        for &r in rows {
            data.extend_from_slice(&x.data[r * w..(r + 1) * w]);
        }
        Ok(Rows {
            data,
            n: rows.len(),
        })
    }

    fn lora_add(
        &self,
        y: &mut Rows,
        x: &Rows,
        lora: &LowRank,
        rows: &[usize],
        scale: f32,
    ) -> Result<()> {
        lora.add_rows(&mut y.data, &x.data, rows, scale);
        Ok(())
    }

    fn to_host(&self, x: Rows) -> Result<Vec<f32>> {
        Ok(x.data)
    }
}
