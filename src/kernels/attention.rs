//! Causal attention over an f16 KV cache with an online softmax, computed the way llama.cpp's
//! CPU flash attention computes it (Q rounded to f16, f32 dot products, the V accumulator
//! kept in f16), so greedy outputs agree with llama.cpp token for token.
//!
//! Layouts: `q` is `[t, n_head * head_dim]` f32 (RoPE applied); keys and values are f16 rows
//! of `n_kv_head * head_dim`, found through a block table ([`KvView`]).
//! Invariant: query `i` sits at position `start + i` and sees keys `0..=start + i` only.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Keys and values of one layer as seen by one sequence: position `p` is row
/// `blocks[p / block_size] * block_size + p % block_size` of `k` and `v`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub blocks: &'a [u32],
    pub block_size: usize,
    /// Values per row: `n_kv_head * head_dim`.
    pub stride: usize,
}

impl KvView<'_> {
    #[inline]
    pub(crate) fn row(&self, pos: usize) -> usize {
        (self.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size)
            * self.stride
    }
}

/// One sequence's part of a packed attention call.
#[derive(Clone, Copy)]
pub struct AttentionSeq<'a> {
    /// First row of this sequence in the packed `q` (and output).
    pub row: usize,
    /// Number of query rows (tokens this step).
    pub len: usize,
    /// Position of the first query row.
    pub start: usize,
    pub kv: KvView<'a>,
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Attention for a packed batch: `q` is `[rows, n_head * head_dim]` holding every sequence's
/// query rows; returns the same shape. The work is split into tasks (see [`plan`]) that run
/// in parallel; each output row is computed by one thread in a fixed order, so results do not
/// depend on batching, the split or the thread count.
pub fn packed_attention(q: &[f32], seqs: &[AttentionSeq], shape: AttentionShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if shape.head_dim.is_multiple_of(8) && shape.head_dim <= 256 {
        return packed_attention_with(q, seqs, shape, super::attention_x86::best());
    }
    packed_attention_with(q, seqs, shape, None)
}

#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug, Clone, Copy)]
enum Variant {}
#[cfg(target_arch = "x86_64")]
use super::attention_x86::Variant;

/// One unit of work: sequence `seq`, KV head `kvh`, the query heads `heads` of its group
/// (absolute head indices) and the query rows `rows` (relative to the sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Task {
    pub seq: usize,
    pub kvh: usize,
    pub heads: std::ops::Range<usize>,
    pub rows: std::ops::Range<usize>,
}

impl Task {
    fn cost(&self, start: usize) -> usize {
        self.heads.len() * self.rows.len() * (start + self.rows.end)
    }
}

/// One task per (sequence, KV head), so the query heads sharing a KV head read its keys once;
/// the costliest tasks are then halved by query rows until there are a few per thread, so one
/// long prompt still uses every core. Heads of a group are split only while there are fewer
/// tasks than threads (one decoding sequence of a model with fewer KV heads than threads):
/// a split group transposes its keys once per part and loses the overlap of its heads'
/// accumulations, which cost more than an uneven split (measured on SmolLM2, 3 KV heads on 2
/// threads: decode at 1,000 tokens of context 1.18x median over 6 pairs).
fn plan(seqs: &[AttentionSeq], shape: AttentionShape) -> Vec<Task> {
    let group = shape.n_head / shape.n_kv_head;
    let mut tasks: Vec<Task> = seqs
        .iter()
        .enumerate()
        .flat_map(|(seq, s)| {
            (0..shape.n_kv_head).map(move |kvh| Task {
                seq,
                kvh,
                heads: kvh * group..(kvh + 1) * group,
                rows: 0..s.len,
            })
        })
        .collect();
    let threads = super::pool::threads();
    let want = 4 * threads;
    while tasks.len() < want {
        let heads_too = tasks.len() < threads;
        let Some((i, _)) = tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.rows.len() > 1 || (heads_too && t.heads.len() > 1))
            .max_by_key(|(_, t)| t.cost(seqs[t.seq].start))
        else {
            break;
        };
        let t = tasks[i].clone();
        let (a, b) = if t.rows.len() > 1 {
            let mid = t.rows.start + t.rows.len() / 2;
            (
                Task {
                    rows: t.rows.start..mid,
                    ..t.clone()
                },
                Task {
                    rows: mid..t.rows.end,
                    ..t
                },
            )
        } else {
            let mid = t.heads.start + t.heads.len() / 2;
            (
                Task {
                    heads: t.heads.start..mid,
                    ..t.clone()
                },
                Task {
                    heads: mid..t.heads.end,
                    ..t
                },
            )
        };
        tasks[i] = a;
        tasks.push(b);
    }
    // Decoding, when the groups do not divide evenly among the threads (SmolLM2's 3 KV heads
    // on 2 threads), the last group with several heads is halved: the threads then end within
    // a head of each other instead of one waiting out a whole group (5 heads against 6 on the
    // slower thread, for one extra key transpose; measured 1.01x at 128 tokens, 1.04x at 500).
    if tasks.len() < want
        && !tasks.len().is_multiple_of(threads)
        && tasks.iter().all(|t| t.rows.len() == 1)
    {
        if let Some(i) = tasks.iter().rposition(|t| t.heads.len() > 1) {
            let t = tasks[i].clone();
            let mid = t.heads.start + t.heads.len().div_ceil(2);
            tasks[i] = Task {
                heads: t.heads.start..mid,
                ..t.clone()
            };
            tasks.push(Task {
                heads: mid..t.heads.end,
                ..t
            });
        }
    }
    tasks
}

fn packed_attention_with(
    q: &[f32],
    seqs: &[AttentionSeq],
    shape: AttentionShape,
    simd: Option<Variant>,
) -> Vec<f32> {
    let AttentionShape {
        n_head, head_dim, ..
    } = shape;
    let width = n_head * head_dim;
    let tasks = plan(seqs, shape);
    // Each task's output: for each of its rows, for each of its heads, `head_dim` values.
    let run = |t: &Task| -> Vec<f32> {
        let seq = &seqs[t.seq];
        let rows = &q[seq.row * width..(seq.row + seq.len) * width];
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = simd {
            // Safety: `best()` checked the CPU features, `packed_attention` the head size.
            return unsafe {
                super::attention_x86::group_attention(v, rows, seq.kv, seq.start, shape, t)
            };
        }
        let _ = simd;
        let mut out = Vec::with_capacity(t.rows.len() * t.heads.len() * head_dim);
        let per_head: Vec<Vec<f32>> = t
            .heads
            .clone()
            .map(|h| head_attention_dispatch(rows, seq.kv, t.rows.clone(), seq.start, shape, h))
            .collect();
        for i in 0..t.rows.len() {
            for ph in &per_head {
                out.extend_from_slice(&ph[i * head_dim..][..head_dim]);
            }
        }
        out
    };
    let mut per_task: Vec<Vec<f32>> = vec![Vec::new(); tasks.len()];
    super::pool::for_chunks_mut(&mut per_task, 1, |i, slot| slot[0] = run(&tasks[i]));
    let mut out = vec![0f32; q.len()];
    for (t, vals) in tasks.iter().zip(&per_task) {
        let seq = &seqs[t.seq];
        let mut it = vals.chunks_exact(head_dim);
        for i in t.rows.clone() {
            for h in t.heads.clone() {
                let src = it
                    .next()
                    .expect("one chunk per (row, head). This is a bug.");
                out[(seq.row + i) * width + h * head_dim..][..head_dim].copy_from_slice(src);
            }
        }
    }
    out
}

/// [`head_attention`] compiled for AVX2 + FMA when the CPU has them (`mul_add` is then one
/// instruction instead of a library call); the same arithmetic either way.
fn head_attention_dispatch(
    q: &[f32],
    kv: KvView,
    rows: std::ops::Range<usize>,
    start: usize,
    shape: AttentionShape,
    h: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn fast(
            q: &[f32],
            kv: KvView,
            rows: std::ops::Range<usize>,
            start: usize,
            shape: AttentionShape,
            h: usize,
        ) -> Vec<f32> {
            head_attention(q, kv, rows, start, shape, h)
        }
        if super::x86::available() {
            // Safety: the features were checked.
            return unsafe { fast(q, kv, rows, start, shape, h) };
        }
    }
    head_attention(q, kv, rows, start, shape, h)
}

/// The portable path: one head's output for the query rows `rows`, `[rows.len(), head_dim]`.
/// Each key's score adds its products in element order (multiply, then add), exactly as the
/// AVX2 path computes it eight keys at a time.
#[inline(always)]
fn head_attention(
    q: &[f32],
    kv: KvView,
    rows: std::ops::Range<usize>,
    start: usize,
    shape: AttentionShape,
    h: usize,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let kv_off = (h / (shape.n_head / shape.n_kv_head)) * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = Vec::with_capacity(rows.len() * hd);
    let mut qh = vec![0f32; hd];
    let mut acc = vec![0f32; hd];
    let mut kr = vec![0f32; hd];
    let mut scores = vec![0f32; start + rows.end];
    for i in rows {
        // Q rounded to f16, as llama.cpp converts it to the K cache's type.
        qh.copy_from_slice(&q[(i * shape.n_head + h) * hd..][..hd]);
        round_to_f16(&mut qh);
        let seen = start + i + 1;
        for (j, s) in scores[..seen].iter_mut().enumerate() {
            kv.k[kv.row(j) + kv_off..][..hd].convert_to_f32_slice(&mut kr);
            let mut sum = 0f32;
            for (&qd, &k) in qh.iter().zip(&kr) {
                sum += qd * k;
            }
            *s = sum;
        }
        accumulate_from_cache(&scores[..seen], scale, &mut acc, kv, kv_off);
        out.extend_from_slice(&acc);
    }
    out
}

/// [`softmax_accumulate`] over the values of `kv` (this head's slice at `kv_off`): with F16C
/// the accumulator stays in f16 registers and values are widened as they are read, exactly
/// as the generic code computes it.
#[inline(always)]
fn accumulate_from_cache(scores: &[f32], scale: f32, acc: &mut [f32], kv: KvView, kv_off: usize) {
    let hd = acc.len();
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && hd <= 256 && super::x86::available() {
        // Safety: AVX2, FMA and F16C were checked.
        unsafe { super::attention_x86::accumulate(scores, scale, acc, kv, kv_off) };
        return;
    }
    let mut vr = vec![0f32; hd];
    softmax_accumulate(scores, scale, acc, |j, dst| {
        kv.v[kv.row(j) + kv_off..][..hd].convert_to_f32_slice(&mut vr);
        dst.copy_from_slice(&vr);
    });
}

/// Online softmax over `scores` (times `scale`) weighting the values `value(j)`, with the
/// accumulator rounded to f16 after every update as llama.cpp's flash attention keeps it.
/// Leaves the normalised output in `acc`. The exponentials are the C library's `expf`, as
/// llama.cpp's: our vectorised one ([`super::silu`], about one ulp away) flipped a clear step
/// of the parity test here (measured 2026-12-03), while SwiGLU's use of it did not.
#[inline(always)]
fn softmax_accumulate(
    scores: &[f32],
    scale: f32,
    acc: &mut [f32],
    mut value: impl FnMut(usize, &mut [f32]),
) {
    let mut v = vec![0f32; acc.len()];
    acc.fill(0.0);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for (j, &raw) in scores.iter().enumerate() {
        let s = raw * scale;
        let (ms, vs) = if s > max {
            let ms = (max - s).exp();
            max = s;
            acc.iter_mut().for_each(|a| *a *= ms);
            round_to_f16(acc);
            (ms, 1.0)
        } else {
            (1.0, (s - max).exp())
        };
        value(j, &mut v);
        for (a, b) in acc.iter_mut().zip(&v) {
            *a = b.mul_add(vs, *a);
        }
        round_to_f16(acc);
        sum = sum * ms + vs;
    }
    acc.iter_mut().for_each(|a| *a /= sum);
}

/// Rounds every value to the nearest f16.
#[inline(always)]
fn round_to_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::x86::available() {
            // Safety: AVX2 and F16C were just checked (cached loads).
            unsafe { super::attention_x86::round_to_f16(x) };
            return;
        }
    }
    for v in x.iter_mut() {
        *v = f16::from_f32(*v).to_f32();
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
