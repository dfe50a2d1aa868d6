//! Embedding requests: a sequence that only runs its prompt, asking each chunk for its final
//! hidden states instead of logits, and pooling them into one vector of unit length.
//!
//! A child of `core`: it works on the engine's private state.

use super::{Engine, ModelRunner};
use crate::engine::request::{Event, FinishReason, Pooling};
use crate::engine::scheduler::Chunk;

/// One embedding request's pooling so far.
#[derive(Debug)]
pub struct Pooler {
    pooling: Pooling,
    dim: usize,
    prompt_len: usize,
    /// The sum of the rows pooled (mean), or the row kept (first, last).
    acc: Vec<f32>,
    /// Positions pooled so far: a chunk computed again (after a preemption) adds nothing.
    next: usize,
}

impl Pooler {
    pub fn new(pooling: Pooling, dim: usize, prompt_len: usize) -> Self {
        Self {
            pooling,
            dim,
            prompt_len,
            acc: vec![0.0; dim],
            next: 0,
        }
    }

    /// The rows (`from..to`, counted from the chunk's first) of the chunk of positions
    /// `start..start + len` that this pooling still has to read, if any: a chunk computed
    /// again after a preemption asks for none it already has.
    pub fn wants(&self, start: usize, len: usize) -> Option<(usize, usize)> {
        let end = start + len;
        let (from, to) = match self.pooling {
            Pooling::Mean => (self.next.max(start), end),
            Pooling::First if self.next == 0 => (0, 1),
            Pooling::First => return None,
            Pooling::Last => (self.prompt_len.saturating_sub(1), self.prompt_len),
        };
        (from >= start && from < to && to <= end).then(|| (from - start, to - start))
    }

    /// Takes the hidden states of positions `start..`, `dim` values each.
    pub fn add(&mut self, start: usize, rows: &[f32]) {
        for (i, row) in rows.chunks_exact(self.dim).enumerate() {
            let pos = start + i;
            let keep = match self.pooling {
                Pooling::Mean => pos == self.next,
                Pooling::First => pos == 0,
                Pooling::Last => pos + 1 == self.prompt_len,
            };
            if !keep {
                continue;
            }
            match self.pooling {
                Pooling::Mean => self.acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v),
                Pooling::First | Pooling::Last => self.acc.copy_from_slice(row),
            }
            self.next = self.next.max(pos + 1);
        }
    }

    /// The embedding: the pooled vector scaled to unit (Euclidean) length, as OpenAI's are.
    pub fn finish(&self) -> Vec<f32> {
        let mut v = self.acc.clone();
        if self.pooling == Pooling::Mean && self.next > 0 {
            let n = self.next as f32;
            v.iter_mut().for_each(|x| *x /= n);
        }
        let norm = v
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            v.iter_mut()
                .for_each(|x| *x = (f64::from(*x) / norm) as f32);
        }
        v
    }
}

impl<M: ModelRunner> Engine<M> {
    /// An embedding request's chunk: pools its rows, and once its prompt is through sends
    /// the embedding and ends it. Returns whether it finished.
    pub(super) fn pool(&mut self, c: &Chunk, rows: Option<Vec<f32>>) -> bool {
        let Some(a) = self.active.get_mut(&c.id) else {
            return false;
        };
        let Some(p) = a.pooler.as_mut() else {
            return false;
        };
        if let (Some(rows), Some((from, _))) = (rows, p.wants(c.start, c.len)) {
            p.add(c.start + from, &rows);
        }
        if c.start + c.len < a.req.prompt.len() {
            return false;
        }
        let v = p.finish();
        let _ = a.events.send(Event::Embedding(v));
        a.end(FinishReason::Stop, None);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &[[f32; 2]]) -> Vec<f32> {
        r.iter().flatten().copied().collect()
    }

    #[test]
    fn mean_pooling_counts_each_position_once_and_scales_to_unit_length() {
        let mut p = Pooler::new(Pooling::Mean, 2, 3);
        assert_eq!(p.wants(0, 2), Some((0, 2)));
        p.add(0, &rows(&[[1.0, 0.0], [3.0, 4.0]]));
        // Preempted and computed again from the start: nothing asked, nothing counts twice.
        assert_eq!(p.wants(0, 2), None);
        p.add(0, &rows(&[[100.0, 0.0], [100.0, 0.0]]));
        // A chunk across the edge: only its new position is asked for, and counts.
        assert_eq!(p.wants(1, 2), Some((1, 2)));
        p.add(1, &rows(&[[100.0, 0.0], [2.0, 2.0]]));
        // Mean (2, 2): unit length (0.7071, 0.7071).
        let v = p.finish();
        assert!(
            (v[0] - 0.5f32.sqrt()).abs() < 1e-6 && (v[1] - v[0]).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn first_and_last_pooling_keep_their_one_row() {
        let mut last = Pooler::new(Pooling::Last, 2, 3);
        assert_eq!((last.wants(0, 2), last.wants(1, 2)), (None, Some((1, 2))));
        last.add(0, &rows(&[[9.0, 9.0], [9.0, 9.0]]));
        last.add(2, &rows(&[[0.0, -2.0]]));
        assert_eq!(last.finish(), vec![0.0, -1.0]);
        let mut first = Pooler::new(Pooling::First, 2, 3);
        assert_eq!((first.wants(0, 2), first.wants(2, 1)), (Some((0, 1)), None));
        first.add(0, &rows(&[[3.0, 4.0], [9.0, 9.0]]));
        assert_eq!(first.wants(0, 2), None, "asked again after a preemption");
        assert_eq!(first.finish(), vec![0.6, 0.8]);
    }
}
