//! The KV block manager: which blocks of the shared pool are free, which are referenced, and
//! which hold a cached prefix. Sequences hold block tables (lists of block ids); this module
//! hands blocks out, shares cached ones and takes them back.
//!
//! Prefix caching (after vLLM's automatic prefix caching): a full, computed block is
//! registered under a chained hash of its tokens and of every token before it, so a later
//! sequence whose prompt starts with the same tokens takes a reference to it instead of
//! recomputing it. A block whose last reference goes away keeps its content and joins an LRU
//! list; it is evicted (its hash forgotten) only when a new block is needed and no empty one
//! is left.
//!
//! A registered block also keeps its tokens: a match by hash is confirmed token by token (no
//! hash collision can hand out wrong keys and values), and a sequence whose tokens part from
//! a cached block's midway can copy the rows they share ([`BlockManager::partial`]).
//!
//! Knows block ids, counts, hashes and tokens; never tensors. Invariants: every block is in exactly
//! one of {empty, evictable (cached, unreferenced), referenced}; `refs[b] > 0` exactly for
//! referenced blocks; a registered block is full and never written again (sequences write
//! only past their cached prefix).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Hash of a block's tokens chained to the hash of everything before it.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The parent hash of a sequence's first block.
pub const ROOT_HASH: u64 = 0x6564_6765_696e_6672; // "edgeinfr"

/// The parent hash of the first block of a sequence run with LoRA adapter `adapter`: its
/// keys and values are the adapter's, so its blocks live apart from the base model's.
pub fn adapter_root(adapter: usize) -> u64 {
    chain_hash(ROOT_HASH, &[u32::MAX, adapter as u32])
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    caching: bool,
    /// Empty block ids; popped from the end, so recently freed blocks are reused first.
    free: Vec<u32>,
    refs: Vec<u32>,
    /// The hash a block is registered under, if any.
    hash_of: Vec<Option<u64>>,
    cached: HashMap<u64, u32>,
    /// Tokens and parent hash of each registered block.
    tokens_of: Vec<Vec<u32>>,
    parent_of: Vec<u64>,
    /// Registered blocks by parent hash (the candidates for a partial match).
    children: HashMap<u64, Vec<u32>>,
    /// Unreferenced cached blocks by the tick they were released at (oldest first).
    lru: BTreeMap<u64, u32>,
    /// The `lru` key of each evictable block.
    lru_key: Vec<u64>,
    tick: u64,
    evictions: u64,
}

impl BlockManager {
    pub fn new(total: usize, block_size: usize, caching: bool) -> Self {
        Self {
            block_size,
            total,
            caching,
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            hash_of: vec![None; total],
            cached: HashMap::new(),
            tokens_of: vec![Vec::new(); total],
            parent_of: vec![0; total],
            children: HashMap::new(),
            lru: BTreeMap::new(),
            lru_key: vec![0; total],
            tick: 0,
            evictions: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks a sequence can still get: empty ones plus evictable cached ones.
    pub fn free_count(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks registered in the prefix cache (referenced or not).
    pub fn cached_count(&self) -> usize {
        self.cached.len()
    }

    /// Cached blocks evicted so far to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Grows `table` to cover `positions` positions from empty blocks only (never evicting
    /// a cached one); false (and `table` unchanged) if there are not enough.
    pub fn ensure_empty(&mut self, table: &mut Vec<u32>, positions: usize) -> bool {
        let needed = self.blocks_for(positions).saturating_sub(table.len());
        needed <= self.free.len() && self.ensure(table, positions)
    }

    /// Gives back the blocks of `table` past the first `positions` positions (never
    /// registered ones: those hold only positions not computed).
    pub fn shrink(&mut self, table: &mut Vec<u32>, positions: usize) {
        let keep = self.blocks_for(positions);
        if table.len() > keep {
            let mut extra = table.split_off(keep);
            self.release(&mut extra);
        }
    }

    /// Grows `table` to cover `positions` positions; false (and `table` unchanged) if there
    /// are not enough free blocks. Empty blocks go first, then the least recently used
    /// cached ones.
    pub fn ensure(&mut self, table: &mut Vec<u32>, positions: usize) -> bool {
        let needed = self.blocks_for(positions).saturating_sub(table.len());
        if needed > self.free_count() {
            return false;
        }
        for _ in 0..needed {
            let b = match self.free.pop() {
                Some(b) => b,
                None => self.evict_oldest(),
            };
            debug_assert_eq!(self.refs[b as usize], 0, "handed out a referenced block");
            self.refs[b as usize] = 1;
            table.push(b);
        }
        true
    }

    fn evict_oldest(&mut self) -> u32 {
        let (_, b) = self
            .lru
            .pop_first()
            .expect("free_count covered the request. This is a bug.");
        if let Some(h) = self.hash_of[b as usize].take() {
            self.cached.remove(&h);
            let parent = self.parent_of[b as usize];
            if let Some(list) = self.children.get_mut(&parent) {
                list.retain(|&c| c != b);
                if list.is_empty() {
                    self.children.remove(&parent);
                }
            }
            self.tokens_of[b as usize].clear();
        }
        self.evictions += 1;
        b
    }

    /// Blocks that releasing every table of `tables` would make available (empty or
    /// evictable): those no one else references.
    pub fn freed_by<'a>(&self, tables: impl IntoIterator<Item = &'a [u32]>) -> usize {
        let mut held: HashMap<u32, u32> = HashMap::new();
        for &b in tables.into_iter().flatten() {
            *held.entry(b).or_default() += 1;
        }
        held.into_iter()
            .filter(|&(b, n)| self.refs[b as usize] == n)
            .count()
    }

    /// Drops a reference to every block of `table` (emptying it). Blocks nobody references
    /// become empty, or evictable when they are cached; the table's last blocks get the
    /// oldest LRU ticks, so a prefix outlives its tail.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..).rev() {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "a block was freed twice. This is a bug.");
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if self.hash_of[b as usize].is_some() {
                self.tick += 1;
                self.lru_key[b as usize] = self.tick;
                self.lru.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Takes a reference to the cached blocks matching the longest run of `hashes` (chained
    /// block hashes from the start of a sequence whose tokens are `tokens`) and returns them
    /// in order. Each match is confirmed against the block's stored tokens.
    pub fn lookup(&mut self, hashes: &[u64], tokens: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        if !self.caching {
            return out;
        }
        let bs = self.block_size;
        for (i, h) in hashes.iter().enumerate() {
            let Some(&b) = self.cached.get(h) else {
                break;
            };
            if self.tokens_of[b as usize][..] != tokens[i * bs..(i + 1) * bs] {
                break;
            }
            self.pin(b);
            out.push(b);
        }
        out
    }

    /// The cached block after `parent` (a chained hash) that starts with the most of `tail`'s
    /// tokens, and how many (at least one); `tail` is shorter than a block.
    pub fn partial(&self, parent: u64, tail: &[u32]) -> Option<(u32, usize)> {
        if !self.caching {
            return None;
        }
        self.children
            .get(&parent)?
            .iter()
            .map(|&b| {
                let common = self.tokens_of[b as usize]
                    .iter()
                    .zip(tail)
                    .take_while(|(x, y)| x == y)
                    .count();
                (b, common)
            })
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(_, n)| n)
    }

    /// Takes one more reference to block `b` (a cached one leaves the LRU list). Undone by
    /// [`Self::release`].
    pub fn pin(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            debug_assert!(self.hash_of[b as usize].is_some(), "pinned an empty block");
            self.lru.remove(&self.lru_key[b as usize]);
        }
        self.refs[b as usize] += 1;
    }

    /// Registers a computed block holding `tokens` after the prefix hashed `parent`, under
    /// `hash` (their [`chain_hash`]). If another block already holds that content, the
    /// existing entry stays and `block` remains private. A block with fewer tokens than a
    /// block holds (the end of a finished sequence, never written again) is only ever found
    /// by [`Self::partial`]: [`Self::lookup`] confirms a full block's tokens.
    pub fn register(&mut self, block: u32, parent: u64, hash: u64, tokens: &[u32]) {
        debug_assert!(!tokens.is_empty() && tokens.len() <= self.block_size);
        if !self.caching || self.hash_of[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hash_of[block as usize] = Some(hash);
            self.parent_of[block as usize] = parent;
            self.tokens_of[block as usize] = tokens.to_vec();
            self.children.entry(parent).or_default().push(block);
        }
    }

    /// Share of blocks referenced by sequences, 0..=1 (cached but unreferenced blocks count
    /// as free: they are given up on demand).
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        1.0 - self.free_count() as f64 / self.total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(tokens: &[u32], bs: usize) -> Vec<u64> {
        let mut parent = ROOT_HASH;
        tokens
            .chunks_exact(bs)
            .map(|c| {
                parent = chain_hash(parent, c);
                parent
            })
            .collect()
    }

    #[test]
    fn ensure_and_release_balance() {
        let mut m = BlockManager::new(4, 16, true);
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

    #[test]
    fn cached_blocks_are_shared_reference_counted_and_evicted_lru() {
        let mut m = BlockManager::new(4, 2, true);
        let h = hashes(&[1, 2, 3, 4], 2);
        let mut a = Vec::new();
        assert!(m.ensure(&mut a, 4));
        m.register(a[0], ROOT_HASH, h[0], &[1, 2]);
        m.register(a[1], h[0], h[1], &[3, 4]);
        assert_eq!(m.cached_count(), 2);
        // A second sequence shares both blocks while the first still holds them.
        let b_blocks = m.lookup(&h, &[1, 2, 3, 4]);
        assert_eq!(b_blocks, a);
        assert_eq!(m.free_count(), 2);
        let mut b = b_blocks;
        // Releasing both would free the shared blocks; one of them, none.
        let mut c = Vec::new();
        assert!(m.ensure(&mut c, 1));
        assert_eq!(m.freed_by([a.as_slice()]), 0);
        assert_eq!(m.freed_by([a.as_slice(), &b]), 2);
        assert_eq!(m.freed_by([a.as_slice(), &c, &b]), 3);
        m.release(&mut c);
        m.release(&mut a);
        assert_eq!(m.free_count(), 2, "still referenced by b");
        m.release(&mut b);
        assert_eq!(
            m.free_count(),
            4,
            "cached but unreferenced blocks count as free"
        );
        assert_eq!(m.cached_count(), 2);
        // A diverging second block: only the first matches.
        let other = hashes(&[1, 2, 9, 9], 2);
        let mut c = m.lookup(&other, &[1, 2, 9, 9]);
        assert_eq!(c.len(), 1);
        m.release(&mut c);
        // Filling the pool evicts the least recently released cached block first: the
        // second block (released before the first block's later use) goes, the first stays.
        let mut d = Vec::new();
        assert!(m.ensure(&mut d, 6));
        assert_eq!(m.evictions(), 1);
        let mut e = m.lookup(&h, &[1, 2, 3, 4]);
        assert_eq!(e.len(), 1, "the first block survived, the second did not");
        m.release(&mut e);
        assert!(m.ensure(&mut d, 8));
        assert_eq!((m.evictions(), m.cached_count(), m.free_count()), (2, 0, 0));
        assert!(!m.ensure(&mut d, 10), "cannot evict referenced blocks");
        m.release(&mut d);
        assert_eq!(m.free_count(), 4);
    }

    #[test]
    fn duplicate_content_keeps_one_entry_and_caching_off_caches_nothing() {
        let mut m = BlockManager::new(4, 2, true);
        let h = hashes(&[5, 6], 2);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(m.ensure(&mut a, 2) && m.ensure(&mut b, 2));
        m.register(a[0], ROOT_HASH, h[0], &[5, 6]);
        m.register(b[0], ROOT_HASH, h[0], &[5, 6]);
        assert_eq!(m.cached_count(), 1);
        m.release(&mut b);
        assert_eq!(m.free.len(), 3, "the private duplicate became empty");
        m.release(&mut a);
        let mut off = BlockManager::new(4, 2, false);
        let mut a = Vec::new();
        assert!(off.ensure(&mut a, 2));
        off.register(a[0], ROOT_HASH, h[0], &[5, 6]);
        assert_eq!(off.cached_count(), 0);
        assert!(off.lookup(&h, &[5, 6]).is_empty());
        assert!(off.partial(ROOT_HASH, &[5]).is_none());
    }

    #[test]
    fn matches_are_confirmed_by_tokens_and_partial_matches_pick_the_longest() {
        let mut m = BlockManager::new(4, 4, true);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(m.ensure(&mut a, 4) && m.ensure(&mut b, 4));
        let h = hashes(&[1, 2, 3, 4], 4);
        m.register(a[0], ROOT_HASH, h[0], &[1, 2, 3, 4]);
        m.register(b[0], ROOT_HASH, hashes(&[1, 2, 7, 7], 4)[0], &[1, 2, 7, 7]);
        // A hash that names a block whose tokens differ (a collision) is not a match.
        assert!(m.lookup(&h, &[1, 2, 3, 5]).is_empty());
        assert_eq!(m.partial(ROOT_HASH, &[1, 2, 3]), Some((a[0], 3)));
        assert_eq!(m.partial(ROOT_HASH, &[1, 2, 7]), Some((b[0], 3)));
        assert_eq!(m.partial(ROOT_HASH, &[1, 9]).map(|p| p.1), Some(1));
        assert_eq!(m.partial(ROOT_HASH, &[9]), None);
        assert_eq!(m.partial(h[0], &[1]), None, "another parent");
        // A pinned cached block is never evicted; once unpinned it can be.
        m.release(&mut a);
        m.release(&mut b);
        m.pin(h_block(&m, &h));
        let mut c = Vec::new();
        assert!(m.ensure(&mut c, 12), "three of four blocks");
        assert!(!m.ensure(&mut c, 16), "the pinned block is not free");
        assert_eq!(m.lookup(&h, &[1, 2, 3, 4]).len(), 1);
        let mut pinned = vec![h_block(&m, &h), h_block(&m, &h)];
        m.release(&mut pinned);
        assert!(m.ensure(&mut c, 16));
        assert_eq!(
            m.partial(ROOT_HASH, &[1, 2, 3]),
            None,
            "evicted with its tokens"
        );
    }

    fn h_block(m: &BlockManager, h: &[u64]) -> u32 {
        m.cached[&h[0]]
    }
}
