//! KV memory: one pool of fixed-size blocks per layer holding keys and values in f16 (as
//! llama.cpp stores them). A sequence owns an ordered list of blocks (its block table); its
//! position `p` lives in block `table[p / block_size]` at row `p % block_size`.
//!
//! Knows storage and layout; never which sequence owns which block (the engine's block manager
//! decides). Invariant: a write touches exactly one row of one block; a copy only the rows
//! it names.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::kernels::attention::KvView;

struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
}

pub struct KvPool {
    block_size: usize,
    n_blocks: usize,
    /// Values per position: `n_kv_head * head_dim`.
    stride: usize,
    layers: Vec<LayerKv>,
}

/// `len` zero halves straight from the allocator's zeroed memory: pages the pool never
/// writes cost nothing, and start-up does not write gigabytes of zeros
/// (`vec![f16::ZERO; len]` would write every element).
fn zeroed(len: usize) -> Result<Vec<f16>, String> {
    bytemuck::allocation::try_zeroed_vec(len)
        .map_err(|()| format!("{} bytes of memory could not be allocated", len * 2))
}

impl KvPool {
    /// The pool, or why its memory cannot be had.
    pub fn new(
        n_layer: usize,
        stride: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Result<Self, String> {
        assert!(
            block_size > 0,
            "block size must be positive. This is a bug."
        );
        let len = n_blocks
            .checked_mul(block_size)
            .and_then(|n| n.checked_mul(stride))
            .filter(|n| n.checked_mul(2 * n_layer.max(1)).is_some())
            .ok_or_else(|| format!("{n_blocks} blocks of {block_size} positions is too large"))?;
        let layers = (0..n_layer)
            .map(|_| {
                Ok(LayerKv {
                    k: zeroed(len)?,
                    v: zeroed(len)?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            block_size,
            n_blocks,
            stride,
            layers,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Bytes of KV memory one position takes across all layers.
    pub fn bytes_per_position(&self) -> usize {
        self.layers.len() * 2 * self.stride * std::mem::size_of::<f16>()
    }

    /// Adds `extra` empty blocks (for a single growing sequence), or says why it cannot.
    pub fn grow(&mut self, extra: usize) -> Result<(), String> {
        let n_blocks = self.n_blocks.saturating_add(extra);
        let too_large = || {
            format!(
                "{n_blocks} blocks of {} positions is too large",
                self.block_size
            )
        };
        let len = n_blocks
            .checked_mul(self.block_size)
            .and_then(|n| n.checked_mul(self.stride))
            .ok_or_else(too_large)?;
        for l in &mut self.layers {
            for v in [&mut l.k, &mut l.v] {
                v.try_reserve_exact(len.saturating_sub(v.len()))
                    .map_err(|e| format!("the KV cache cannot grow: {e}"))?;
                v.resize(len, f16::ZERO);
            }
        }
        self.n_blocks = n_blocks;
        Ok(())
    }

    fn offset(&self, blocks: &[u32], pos: usize) -> usize {
        (blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size)
            * self.stride
    }

    /// Stores one position's key and value rows (f32, rounded to f16).
    pub fn write(&mut self, layer: usize, blocks: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let off = self.offset(blocks, pos);
        let stride = self.stride;
        let l = &mut self.layers[layer];
        // Slice conversions (F16C where the CPU has it): the same rounding as one by one.
        l.k[off..off + stride].convert_from_f32_slice(&k[..stride]);
        l.v[off..off + stride].convert_from_f32_slice(&v[..stride]);
    }

    /// Copies rows `0..rows` of block `src` into block `dst`, in every layer.
    pub fn copy_rows(&mut self, src: u32, dst: u32, rows: usize) {
        assert!(
            rows <= self.block_size
                && (src as usize) < self.n_blocks
                && (dst as usize) < self.n_blocks,
            "block copy out of range. This is a bug."
        );
        let at = |b: u32| b as usize * self.block_size * self.stride;
        let (from, to, len) = (at(src), at(dst), rows * self.stride);
        for l in &mut self.layers {
            l.k.copy_within(from..from + len, to);
            l.v.copy_within(from..from + len, to);
        }
    }

    /// A read view of one layer through a sequence's block table.
    pub fn view<'a>(&'a self, layer: usize, blocks: &'a [u32]) -> KvView<'a> {
        let l = &self.layers[layer];
        KvView {
            k: &l.k,
            v: &l.v,
            blocks,
            block_size: self.block_size,
            stride: self.stride,
        }
    }
}
