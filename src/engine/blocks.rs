//! The KV block manager: which blocks of the shared pool are free. Sequences hold block
//! tables (lists of block ids); this module hands blocks out and takes them back.
//!
//! Knows block ids and counts; never tensors. Invariant: a block is either free or owned by
//! exactly one sequence, and `free + owned == total` at all times. (Prefix caching will add
//! reference counts and content hashes on top of this.)

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    /// Free block ids; popped from the end, so recently freed blocks are reused first.
    free: Vec<u32>,
}

impl BlockManager {
    pub fn new(total: usize, block_size: usize) -> Self {
        Self {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Grows `table` to cover `positions` positions; false (and `table` unchanged) if there
    /// are not enough free blocks.
    pub fn ensure(&mut self, table: &mut Vec<u32>, positions: usize) -> bool {
        let needed = self.blocks_for(positions).saturating_sub(table.len());
        if needed > self.free.len() {
            return false;
        }
        let at = self.free.len() - needed;
        table.extend(self.free.drain(at..).rev());
        true
    }

    /// Returns every block of `table` to the free list.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
        debug_assert!(
            self.free.len() <= self.total,
            "a block was freed twice. This is a bug."
        );
    }

    /// Share of blocks in use, 0..=1.
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_and_release_balance() {
        let mut m = BlockManager::new(4, 16);
        let mut a = Vec::new();
        assert!(m.ensure(&mut a, 17));
        assert_eq!(a.len(), 2);
        assert!(m.ensure(&mut a, 32), "still two blocks");
        assert_eq!(a.len(), 2);
        let mut b = Vec::new();
        assert!(!m.ensure(&mut b, 48), "three blocks do not fit in two");
        assert!(b.is_empty());
        assert!(m.ensure(&mut b, 20));
        assert_eq!(m.free_count(), 0);
        assert_eq!(m.usage(), 1.0);
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3], "no block handed out twice");
        m.release(&mut a);
        m.release(&mut b);
        assert_eq!(m.free_count(), 4);
        assert!(a.is_empty() && b.is_empty());
    }
}
