//! Scheduler tests: budgets, chunked prefill, mixed steps, preemption, removal, prefix
//! caching. No model.
use super::*;

fn sched(max_batch_size: usize, max_batch_tokens: usize, blocks: usize) -> Scheduler {
    sched_cached(max_batch_size, max_batch_tokens, blocks, false)
}

fn sched_cached(
    max_batch_size: usize,
    max_batch_tokens: usize,
    blocks: usize,
    caching: bool,
) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_batch_size,
            max_batch_tokens,
            max_scored_rows: max_batch_tokens,
            max_draft_rows: 8,
            max_background_rows: 0,
        },
        BlockManager::new(blocks, 4, caching),
    )
}

/// A prompt of `len` tokens no other sequence shares.
fn prompt(id: SeqId, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| id as u32 * 1000 + i).collect()
}

fn add(s: &mut Scheduler, id: SeqId, len: usize) {
    s.add(id, &prompt(id, len), true);
}

/// The token a sequence "samples" at a step: deterministic per sequence and position.
fn token(id: SeqId, pos: usize) -> u32 {
    500_000 + id as u32 * 1000 + pos as u32
}

/// Runs one step, pretending every sequence with logits sampled a token.
fn run(s: &mut Scheduler) -> Step {
    let step = s.schedule();
    let sampled: Vec<(SeqId, u32)> = step
        .chunks
        .iter()
        .filter(|c| c.logits)
        .map(|c| (c.id, token(c.id, c.start + c.len)))
        .collect();
    s.complete(&step, &sampled);
    step
}

#[test]
fn long_prompts_are_chunked_and_decodes_keep_running() {
    let mut s = sched(4, 8, 100);
    add(&mut s, 1, 3);
    let st = run(&mut s);
    assert_eq!(
        st.chunks,
        vec![Chunk {
            id: 1,
            start: 0,
            len: 3,
            logits: true,
            draft: 0
        }]
    );
    assert_eq!(st.admitted, vec![1]);
    add(&mut s, 2, 20);
    // Seq 1 decodes one token; seq 2 gets the remaining budget of 7.
    let st = run(&mut s);
    assert_eq!(
        st.chunks[0],
        Chunk {
            id: 1,
            start: 3,
            len: 1,
            logits: true,
            draft: 0
        }
    );
    assert_eq!(
        st.chunks[1],
        Chunk {
            id: 2,
            start: 0,
            len: 7,
            logits: false,
            draft: 0
        }
    );
    let st = run(&mut s);
    assert_eq!(
        st.chunks[1],
        Chunk {
            id: 2,
            start: 7,
            len: 7,
            logits: false,
            draft: 0
        }
    );
    let st = run(&mut s);
    assert_eq!(st.chunks[0].len, 1, "seq 1 decodes every step");
    assert_eq!(
        st.chunks[1],
        Chunk {
            id: 2,
            start: 14,
            len: 6,
            logits: true,
            draft: 0
        }
    );
    let st = run(&mut s);
    assert_eq!(st.chunks.len(), 2);
    assert!(st.chunks.iter().all(|c| c.len == 1 && c.logits));
}

#[test]
fn batch_size_limits_running_sequences() {
    let mut s = sched(2, 64, 100);
    for id in 1..=3 {
        add(&mut s, id, 5);
    }
    let st = run(&mut s);
    assert_eq!(
        st.chunks.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!((s.running_count(), s.waiting_count()), (2, 1));
    s.remove(1);
    let st = run(&mut s);
    assert_eq!(
        st.chunks.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(st.admitted, vec![3]);
}

#[test]
fn out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
    // 4 blocks of 4 positions: two sequences of 8 tokens fill the pool.
    let mut s = sched(4, 64, 4);
    add(&mut s, 1, 8);
    add(&mut s, 2, 8);
    run(&mut s);
    assert_eq!(s.free_blocks(), 0);
    // Both want a 9th position (a new block each): seq 2, the newest, is preempted.
    let st = s.schedule();
    assert_eq!(st.preempted, vec![2]);
    assert_eq!(
        st.chunks,
        vec![Chunk {
            id: 1,
            start: 8,
            len: 1,
            logits: true,
            draft: 0
        }]
    );
    s.complete(&st, &[(1, 7)]);
    assert_eq!(s.waiting_count(), 1);
    // Seq 1 finishes: seq 2 is recomputed from position 0 (its 8 prompt + 1 sampled tokens).
    s.remove(1);
    let st = s.schedule();
    assert_eq!(
        st.chunks,
        vec![Chunk {
            id: 2,
            start: 0,
            len: 9,
            logits: true,
            draft: 0
        }]
    );
    assert!(st.admitted.is_empty(), "seq 2 already ran once");
}

#[test]
fn waiting_sequences_wait_for_blocks_without_deadlock() {
    let mut s = sched(4, 64, 3);
    add(&mut s, 1, 10); // 3 blocks
    add(&mut s, 2, 4);
    let st = run(&mut s);
    assert_eq!(st.chunks.len(), 1, "seq 2 waits: no block left");
    s.remove(1);
    assert_eq!(s.free_blocks(), 3);
    let st = run(&mut s);
    assert_eq!(st.chunks[0].id, 2);
}

#[test]
fn removal_frees_everything_and_idle_means_empty() {
    let mut s = sched(4, 16, 10);
    add(&mut s, 1, 9);
    add(&mut s, 2, 30);
    run(&mut s);
    run(&mut s);
    s.remove(2);
    s.remove(1);
    assert!(s.is_idle());
    assert_eq!(s.free_blocks(), 10);
    assert_eq!(s.schedule(), Step::default());
}

/// Runs `id` alone until it has `total` tokens (prompt plus sampled), then returns them.
fn run_until(s: &mut Scheduler, id: SeqId, total: usize) -> Vec<u32> {
    while s.seqs[&id].tokens.len() < total {
        run(s);
    }
    s.seqs[&id].tokens.clone()
}

#[test]
fn a_later_prompt_reuses_full_blocks_of_prompt_and_generated_tokens() {
    let mut s = sched_cached(4, 64, 20, true);
    add(&mut s, 1, 6);
    // 6 prompt tokens + 4 sampled: positions 0..9 computed, blocks 0 and 1 full.
    let first = run_until(&mut s, 1, 10);
    s.remove(1);
    assert_eq!(
        s.free_blocks(),
        20,
        "cached blocks count as free when unreferenced"
    );
    // Blocks 0 and 1, and block 2's one computed row (kept to be copied).
    assert_eq!(s.cache_stats().0, 3);
    // A follow-up: the whole first sequence plus a new turn.
    let mut follow = first.clone();
    follow.extend([1, 2, 3]);
    s.add(2, &follow, true);
    let st = run(&mut s);
    assert_eq!(s.cached_tokens(2), 9);
    assert_eq!(
        st.chunks,
        vec![Chunk {
            id: 2,
            start: 9,
            len: 4,
            logits: true,
            draft: 0
        }]
    );
    s.remove(2);
    // Diverging in the middle of the second block: the first block is shared, and the two
    // rows of the second that match are copied into the new sequence's own block.
    let mut diverge = first[..6].to_vec();
    diverge.extend([77, 78, 79]);
    s.add(3, &diverge, true);
    let before = s.free_blocks();
    let st = s.schedule();
    assert_eq!((s.cached_tokens(3), st.chunks[0].start), (6, 6));
    let own = s.blocks(3)[1];
    assert_eq!(st.copies.len(), 1);
    let c = st.copies[0];
    assert_eq!((c.dst, c.rows), (own, 2));
    assert!(c.src != own && !s.blocks(3).contains(&c.src));
    // Until the step completes the source is held: the shared block, two own blocks (nine
    // positions) and the source.
    assert_eq!(before - s.free_blocks(), 4);
    s.complete(&st, &[(3, 5)]);
    assert_eq!(before - s.free_blocks(), 3, "the source is free again");
    // It is still cached: another sequence finds it.
    assert_eq!(
        s.blocks.partial(s.seqs[&3].hashes[0], &first[4..7]),
        Some((c.src, 3))
    );
    s.remove(3);
    // cache = false bypasses it.
    s.add(4, &follow, false);
    let st = run(&mut s);
    assert_eq!((s.cached_tokens(4), st.chunks[0].start), (0, 0));
}

#[test]
fn a_partial_prefix_whose_block_is_needed_is_computed_instead_of_copied() {
    // Four blocks of 4. The first sequence leaves two full blocks and a partial one (two
    // rows) in the cache; the second takes the two, and its other two blocks are the last
    // free one and the partial one, which the copy would hold: so it is not copied.
    let mut s = sched_cached(4, 64, 4, true);
    add(&mut s, 1, 10);
    run(&mut s);
    s.remove(1);
    let mut next = prompt(1, 10);
    next.extend([7, 8, 9, 10, 11, 12]);
    s.add(2, &next, true);
    let st = s.schedule();
    assert!(st.copies.is_empty(), "{:?}", st.copies);
    assert_eq!(
        st.chunks,
        vec![Chunk {
            id: 2,
            start: 8,
            len: 8,
            logits: true,
            draft: 0
        }]
    );
    assert_eq!((s.cached_tokens(2), s.free_blocks()), (8, 0));
    s.complete(&st, &[(2, 5)]);
    // With a block to spare, the same prompt copies the rows as before.
    let mut s = sched_cached(4, 64, 5, true);
    add(&mut s, 1, 10);
    run(&mut s);
    s.remove(1);
    s.add(2, &next, true);
    let st = s.schedule();
    assert_eq!((st.copies.len(), st.chunks[0].start), (1, 10));
    assert_eq!(s.cached_tokens(2), 10);
}

#[test]
fn the_last_token_is_always_computed_and_shared_blocks_are_never_written() {
    let mut s = sched_cached(4, 64, 20, true);
    add(&mut s, 1, 8);
    run(&mut s);
    s.remove(1);
    // The same 8 tokens again: both blocks are cached, but the last token must produce
    // logits, so the first block is shared and the second's first three rows are copied
    // into a new block, where the last token is computed.
    s.add(2, &prompt(1, 8), true);
    let st = run(&mut s);
    assert_eq!(st.chunks[0].start, 7);
    assert_eq!(s.cached_tokens(2), 7);
    assert_eq!(st.copies[0].rows, 3);
    s.add(3, &prompt(1, 8), true);
    run(&mut s);
    let (b2, b3) = (s.blocks(2).to_vec(), s.blocks(3).to_vec());
    assert_eq!(b2[0], b3[0], "the cached first block is shared");
    assert_ne!(b2[1], b3[1], "blocks written by a sequence are its own");
}

#[test]
fn concurrent_sequences_share_a_cached_prefix_and_idle_frees_everything() {
    let mut s = sched_cached(4, 64, 12, true);
    let shared = prompt(9, 8);
    s.add(1, &shared, true);
    run(&mut s);
    s.remove(1);
    let (mut p2, mut p3) = (shared.clone(), shared.clone());
    p2.extend([1, 2]);
    p3.extend([3, 4, 5]);
    s.add(2, &p2, true);
    s.add(3, &p3, true);
    let st = run(&mut s);
    assert_eq!((s.cached_tokens(2), s.cached_tokens(3)), (8, 8));
    assert_eq!(
        st.chunks.iter().map(|c| c.start).collect::<Vec<_>>(),
        [8, 8]
    );
    assert_eq!(s.blocks(2)[..2], s.blocks(3)[..2]);
    // 2 shared blocks + one own block each.
    assert_eq!(s.free_blocks(), 12 - 4);
    s.remove(2);
    s.remove(3);
    assert_eq!(s.free_blocks(), 12);
}

#[test]
fn a_small_pool_evicts_cached_blocks_and_requests_still_run() {
    let mut s = sched_cached(4, 64, 6, true);
    for id in 1..=5 {
        add(&mut s, id, 12); // 3 blocks, plus a 4th for the sampled tokens
        run_until(&mut s, id, 14);
        s.remove(id);
        assert_eq!(s.free_blocks(), 6, "nothing leaks");
        assert!(s.cache_stats().0 <= 6, "the cache never overruns the pool");
    }
    assert!(s.cache_stats().1 > 0, "old prefixes were evicted");
    // The last sequence's prefix survived; the first one's did not.
    add(&mut s, 6, 1);
    s.remove(6);
    s.add(7, &prompt(5, 12), true);
    run(&mut s);
    assert_eq!(s.cached_tokens(7), 11, "all but the last token");
    s.remove(7);
    s.add(8, &prompt(1, 12), true);
    run(&mut s);
    assert_eq!(s.cached_tokens(8), 0);
}

#[test]
fn preempted_sequences_resume_from_their_cached_blocks() {
    // 4 blocks: two sequences of 8 tokens fill the pool, as in the preemption test above.
    let mut s = sched_cached(4, 64, 4, true);
    add(&mut s, 1, 8);
    add(&mut s, 2, 8);
    run(&mut s);
    let st = s.schedule();
    assert_eq!(st.preempted, vec![2]);
    s.complete(&st, &[(1, 7)]);
    s.remove(1);
    // Seq 2's blocks were registered before it lost them. Seq 1's new block took the
    // least recently used one, seq 2's tail; seq 2 takes its first block back instead of
    // recomputing from 0.
    assert_eq!(s.cache_stats().1, 1, "one eviction");
    let st = s.schedule();
    assert_eq!(st.chunks[0].id, 2);
    assert_eq!(st.chunks[0].start, 4);
}

#[test]
fn a_burst_sharing_an_uncached_prefix_computes_it_once() {
    let mut s = sched_cached(8, 64, 40, true);
    let shared = prompt(7, 12);
    for id in 1..=3 {
        s.add(id, &shared, true);
    }
    add(&mut s, 4, 5); // unrelated: admitted at once
    let st = run(&mut s);
    let ids: Vec<SeqId> = st.chunks.iter().map(|c| c.id).collect();
    assert_eq!(ids, [1, 4], "2 and 3 wait for 1's blocks");
    assert_eq!(s.waiting_count(), 2);
    let st = run(&mut s);
    assert_eq!(st.admitted, [2, 3]);
    for id in [2, 3] {
        // Two full blocks shared, three rows of the third copied: only the last token runs.
        assert_eq!(s.cached_tokens(id), 11);
        let c = st.chunks.iter().find(|c| c.id == id).unwrap();
        assert_eq!((c.start, c.len), (11, 1));
    }
    // With the cache off nothing waits.
    let mut off = sched_cached(8, 64, 40, false);
    for id in 1..=3 {
        off.add(id, &shared, true);
    }
    assert_eq!(run(&mut off).chunks.len(), 3);
}

#[test]
fn the_computed_rows_of_a_finished_sequences_last_block_are_copied_by_the_next_turn() {
    let mut s = sched_cached(4, 64, 20, true);
    add(&mut s, 1, 6);
    // 6 prompt tokens + 3 sampled: positions 0..8 computed; block 1 is full, block 2 holds
    // one computed row (position 8) and is not registered while the sequence runs.
    let first = run_until(&mut s, 1, 10);
    assert_eq!(s.seqs[&1].computed, 9);
    s.remove(1);
    let mut follow = first.clone();
    follow.extend([1, 2, 3]);
    s.add(2, &follow, true);
    let st = run(&mut s);
    assert_eq!(
        s.cached_tokens(2),
        9,
        "two shared blocks and one copied row"
    );
    assert_eq!((st.chunks[0].start, st.copies[0].rows), (9, 1));
    // A partial block is never taken whole: a prompt equal to its rows plus more is
    // computed after the copy, into the sequence's own block.
    assert!(!s.blocks(2).contains(&st.copies[0].src));
}

#[test]
fn sequences_of_other_cache_roots_share_no_blocks() {
    let mut s = sched_cached(4, 64, 40, true);
    add(&mut s, 1, 6);
    let first = run_until(&mut s, 1, 10);
    s.remove(1);
    let mut follow = first.clone();
    follow.extend([1, 2, 3]);
    // Another root (a LoRA adapter's): neither the full blocks nor the partial one's rows.
    s.add(2, &follow, true);
    s.set_cache_root(2, 7);
    run(&mut s);
    assert_eq!(s.cached_tokens(2), 0);
    let second = run_until(&mut s, 2, follow.len() + 3);
    s.remove(2);
    // A later sequence of that root finds its blocks; one of the first root finds its own.
    s.add(3, &second, true);
    s.set_cache_root(3, 7);
    s.add(4, &follow, true);
    run(&mut s);
    assert_eq!(s.cached_tokens(3), 15);
    assert_eq!(s.cached_tokens(4), 9);
}

#[test]
fn scored_prompts_share_a_steps_scored_rows() {
    let mut s = sched(4, 32, 100);
    s.config.max_scored_rows = 10;
    s.add_scoring(1, &prompt(1, 25));
    s.add_scoring(2, &prompt(2, 6));
    add(&mut s, 3, 12);
    // Seq 1 takes every scored row; seq 2 waits while seq 3, not scored, goes past it.
    assert_eq!(lens(&run(&mut s)), vec![(1, 10), (3, 12)]);
    assert_eq!(lens(&run(&mut s)), vec![(1, 10), (3, 1)]);
    // The rest of seq 1's prompt (5) and seq 2's first 5 rows.
    assert_eq!(lens(&run(&mut s)), vec![(1, 5), (3, 1), (2, 5)]);
    // Past its prompt a scored sequence decodes as any other; seq 2 finishes its prompt.
    let st = run(&mut s);
    assert_eq!(lens(&st), vec![(1, 1), (3, 1), (2, 1)]);
    assert!(st.chunks.iter().all(|c| c.logits));
}

fn lens(st: &Step) -> Vec<(SeqId, usize)> {
    st.chunks.iter().map(|c| (c.id, c.len)).collect()
}

#[test]
fn a_preempted_scored_prompt_recomputes_its_scored_rows_uncapped() {
    let mut s = sched(2, 32, 6);
    s.config.max_scored_rows = 8;
    add(&mut s, 0, 7);
    s.add_scoring(1, &prompt(1, 20));
    assert_eq!(lens(&run(&mut s)), vec![(0, 7), (1, 8)]);
    assert_eq!(lens(&run(&mut s)), vec![(0, 1), (1, 8)]);
    // Seq 0's next position needs a block: seq 1, the newest, gives its four back.
    let st = run(&mut s);
    assert_eq!(st.preempted, vec![1]);
    s.remove(0);
    // Its 16 scored positions come back without logits (all but the last row before
    // them), past the scored-row bound; then the bound holds again.
    let st = run(&mut s);
    assert_eq!(lens(&st), vec![(1, 15)]);
    assert_eq!(lens(&run(&mut s)), vec![(1, 5)]);
}

#[test]
fn drafts_run_after_the_last_token_and_keep_what_sampling_confirmed() {
    let mut s = sched_cached(4, 16, 100, true);
    add(&mut s, 1, 6);
    add(&mut s, 2, 6);
    run(&mut s);
    // Seq 1 offers 3 drafts, seq 2 offers 6. A waiting sequence's prefill goes first (6
    // of the step's 16 tokens); drafts take what is left (8, at most 8).
    s.set_draft(1, 3);
    s.set_draft(2, 6);
    add(&mut s, 3, 6);
    let st = s.schedule();
    assert_eq!(
        st.chunks[..2],
        [
            Chunk {
                id: 1,
                start: 6,
                len: 4,
                logits: true,
                draft: 3
            },
            Chunk {
                id: 2,
                start: 6,
                len: 6,
                logits: true,
                draft: 5
            }
        ]
    );
    assert_eq!(lens(&st)[2..], [(3, 6)]);
    // Seq 1 kept two drafts (three tokens sampled); seq 2 none (one token).
    s.complete(&st, &[(1, 70), (1, 71), (1, 99), (2, 80)]);
    // Offers last one step: the next decodes one token each, after what was kept.
    let st = s.schedule();
    let decodes: Vec<(SeqId, usize, usize)> = st
        .chunks
        .iter()
        .filter(|c| c.id != 3)
        .map(|c| (c.id, c.start, c.len))
        .collect();
    assert_eq!(decodes, vec![(1, 9, 1), (2, 7, 1)]);
    assert!(st.chunks.iter().all(|c| c.draft == 0));
    s.complete(&st, &[(1, 5), (2, 6)]);
    // The prefix cache holds confirmed tokens: a sequence starting with seq 1's first
    // nine takes the two full blocks of them.
    s.remove(3);
    let mut nine = prompt(1, 6);
    nine.extend([token(1, 6), 70, 71]);
    s.add(4, &nine, true);
    s.schedule();
    assert_eq!(s.cached_tokens(4), 8);
}

#[test]
fn drafts_take_empty_blocks_only() {
    for (blocks, drafted) in [(5, 3), (4, 0)] {
        let mut s = sched_cached(4, 16, blocks, true);
        // A finished sequence leaves two cached blocks; seq 1 holds two more.
        add(&mut s, 9, 8);
        run(&mut s);
        s.remove(9);
        add(&mut s, 1, 6);
        run(&mut s);
        // Three drafts need a third block: an empty one if there is one, never a cached
        // one (the third cached block is seq 1's own first).
        s.set_draft(1, 3);
        let st = run(&mut s);
        assert_eq!(st.chunks[0].draft, drafted, "{blocks} blocks");
        assert_eq!(s.cache_stats(), (3, 0), "{blocks} blocks");
    }
}

#[path = "scheduler_tenant_tests.rs"]
mod tenants;
