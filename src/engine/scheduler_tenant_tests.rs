//! Scheduler tests of tenants: fair admission, whose sequence is preempted, and background
//! sequences giving their places to foreground ones.
use super::*;

/// Tenant 7's background (batch) requests.
fn batch() -> Tenant {
    Tenant {
        background: true,
        ..Tenant::from(7)
    }
}

#[test]
fn waiting_sequences_are_admitted_fairly_among_tenants() {
    let mut s = sched(2, 64, 100);
    let queue = |s: &mut Scheduler, id: SeqId, tenant: u64| {
        add(s, id, 5);
        s.set_tenant(id, tenant);
    };
    // Tenant 7 queues four sequences and two run; tenant 9's, queued after them, is next.
    for id in 1..=4 {
        queue(&mut s, id, 7);
    }
    assert_eq!(run(&mut s).admitted, vec![1, 2]);
    queue(&mut s, 5, 9);
    s.remove(1);
    assert_eq!(run(&mut s).admitted, vec![5]);
    s.remove(5);
    assert_eq!(run(&mut s).admitted, vec![3]);
    // One slot: the tenant running fewer gets it.
    queue(&mut s, 6, 11);
    queue(&mut s, 7, 11);
    s.remove(2);
    assert_eq!(run(&mut s).admitted, vec![6]);
    // Two slots, both tenants running none: the earliest first, then the other tenant.
    s.remove(3);
    s.remove(6);
    queue(&mut s, 8, 7);
    assert_eq!(run(&mut s).admitted, vec![4, 7]);
}

#[test]
fn a_waiting_foreground_sequence_takes_a_background_ones_place() {
    let mut s = sched(2, 64, 100);
    let batch = batch();
    for id in [1, 2, 3] {
        add(&mut s, id, 5);
        s.set_tenant(id, batch);
    }
    assert_eq!(run(&mut s).admitted, vec![1, 2]);
    run(&mut s);
    // A foreground sequence arrives with both places taken: the newest batch sequence gives
    // its place at once, and waits behind it with the batch's own waiting one.
    add(&mut s, 4, 5);
    let st = run(&mut s);
    assert_eq!((st.preempted, st.admitted), (vec![2], vec![4]));
    let planned: Vec<SeqId> = st.chunks.iter().map(|c| c.id).collect();
    assert_eq!(planned, vec![1, 4]);
    // The place that frees next goes back to the batch, the preempted one first.
    s.remove(1);
    let st = run(&mut s);
    assert!(st.preempted.is_empty());
    assert_eq!(
        st.chunks.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![4, 2]
    );
    // Foreground sequences never preempt each other.
    add(&mut s, 5, 5);
    let st = run(&mut s);
    assert_eq!(st.preempted, vec![2]);
    add(&mut s, 6, 5);
    assert!(run(&mut s).preempted.is_empty());
}

#[test]
fn a_place_given_up_for_a_foreground_sequence_is_not_retaken_by_the_background() {
    // Three places: two batch sequences decode, a foreground one prefills a 14-token prompt.
    let mut s = sched_cached(3, 12, 100, true);
    let batch = batch();
    for id in [2, 3] {
        add(&mut s, id, 2);
        s.set_tenant(id, batch);
    }
    assert_eq!(run(&mut s).admitted, vec![2, 3]);
    let shared: Vec<u32> = (0..14).collect();
    s.add(1, &shared, true);
    assert_eq!(run(&mut s).admitted, vec![1]);
    // A second foreground sequence with the same prompt takes batch sequence 3's place, but
    // waits a step for the block sequence 1 computes in it: the place stays empty rather
    // than going back to 3 (to be taken from it again next step).
    s.add(4, &shared, true);
    let st = s.schedule();
    assert_eq!(st.preempted, vec![3]);
    let planned: Vec<SeqId> = st.chunks.iter().map(|c| c.id).collect();
    assert_eq!(planned, vec![2, 1]);
}

#[test]
fn a_background_prompt_waits_a_step_for_a_foreground_one_and_then_takes_short_chunks() {
    // 32 tokens a step: a batch sequence prefills a 100-token prompt, 32 tokens at a time.
    let mut s = sched(4, 32, 100);
    add(&mut s, 1, 100);
    s.set_tenant(1, batch());
    assert_eq!(run(&mut s).chunks[0].len, 32);
    // A foreground prompt of 5 tokens is admitted at once, in a step of its own.
    add(&mut s, 2, 5);
    let st = run(&mut s);
    let planned: Vec<(SeqId, usize, usize)> =
        st.chunks.iter().map(|c| (c.id, c.start, c.len)).collect();
    assert_eq!(planned, vec![(2, 0, 5)]);
    // While it decodes, the batch's prompt goes on after it, 32 / 16 = 2 tokens a step.
    let planned: Vec<(SeqId, usize)> = run(&mut s).chunks.iter().map(|c| (c.id, c.len)).collect();
    assert_eq!(planned, vec![(2, 1), (1, 2)]);
    // Alone again, it takes short chunks for 16 more steps (the client may send its next
    // request at once), then whole steps.
    s.remove(2);
    for _ in 0..16 {
        assert_eq!(run(&mut s).chunks[0].len, 2);
    }
    assert_eq!(run(&mut s).chunks[0].len, 32);
}

#[test]
fn background_prompts_alone_share_their_own_rows_and_a_foreground_one_does_not() {
    // 32 tokens a step, at most 8 of them background prompts', together.
    let config = SchedulerConfig {
        max_batch_size: 4,
        max_batch_tokens: 32,
        max_scored_rows: 32,
        max_draft_rows: 8,
        max_background_rows: 8,
    };
    let mut s = Scheduler::new(config, BlockManager::new(100, 4, false));
    for id in [1, 2] {
        add(&mut s, id, 20);
        s.set_tenant(id, batch());
    }
    let planned = |st: &Step| -> Vec<(SeqId, usize, usize)> {
        st.chunks.iter().map(|c| (c.id, c.start, c.len)).collect()
    };
    assert_eq!(planned(&run(&mut s)), vec![(1, 0, 8)]);
    assert_eq!(planned(&run(&mut s)), vec![(1, 8, 8)]);
    assert_eq!(planned(&run(&mut s)), vec![(1, 16, 4), (2, 0, 4)]);
    // A background sequence decoding takes its row beside them.
    assert_eq!(planned(&run(&mut s)), vec![(1, 20, 1), (2, 4, 8)]);
    // A foreground prompt arrives: a step of its own (beside the background decode), then
    // the background prompts share 32 / 16 = 2 rows a step.
    add(&mut s, 3, 5);
    assert_eq!(planned(&run(&mut s)), vec![(1, 21, 1), (3, 0, 5)]);
    let st = run(&mut s);
    assert_eq!(planned(&st), vec![(1, 22, 1), (3, 5, 1), (2, 12, 2)]);
    // A foreground prompt alone takes the whole budget.
    for id in [1, 2, 3] {
        s.remove(id);
    }
    add(&mut s, 4, 40);
    assert_eq!(planned(&run(&mut s)), vec![(4, 0, 32)]);
}

#[test]
fn the_background_rows_near_foreground_ones_are_never_more_than_alone() {
    let with = |max_batch_tokens, max_background_rows| {
        let config = SchedulerConfig {
            max_batch_size: 4,
            max_batch_tokens,
            max_scored_rows: max_batch_tokens,
            max_draft_rows: 0,
            max_background_rows,
        };
        let s = Scheduler::new(config, BlockManager::new(10, 4, false));
        (s.background_rows(true), s.background_rows(false))
    };
    assert_eq!(with(256, 64), (16, 64));
    assert_eq!(with(2048, 64), (64, 64));
    assert_eq!(with(2048, 0), (128, usize::MAX));
}

#[test]
fn a_foreground_sequence_out_of_blocks_takes_a_background_ones() {
    // 6 blocks of 4 positions: two batch sequences hold 3 each (11-token prompts).
    let mut s = sched(4, 64, 6);
    let batch = batch();
    for id in [1, 2] {
        add(&mut s, id, 11);
        s.set_tenant(id, batch);
    }
    assert_eq!(run(&mut s).admitted, vec![1, 2]);
    assert_eq!(s.free_blocks(), 0);
    // Places are free, blocks are not: the newest batch sequence gives its blocks up.
    add(&mut s, 3, 4);
    let st = run(&mut s);
    assert_eq!((st.preempted, st.admitted), (vec![2], vec![3]));
    let planned: Vec<(SeqId, usize)> = st.chunks.iter().map(|c| (c.id, c.len)).collect();
    assert_eq!(planned, vec![(1, 1), (3, 4)]);
    // Batch sequences out of blocks (preempted 2, offered first, then 4) take none from
    // another, nor from a foreground one: nothing is preempted or admitted.
    add(&mut s, 4, 4);
    s.set_tenant(4, batch);
    let st = run(&mut s);
    assert!(st.preempted.is_empty() && st.admitted.is_empty());
}

#[test]
fn background_sequences_give_up_blocks_only_when_that_is_enough() {
    // 6 blocks of 4 positions: foreground 1 holds 3, batch 2 holds 2, one is free.
    let mut s = sched(4, 64, 6);
    add(&mut s, 1, 7);
    add(&mut s, 2, 5);
    s.set_tenant(2, batch());
    // The batch sequence is admitted once no foreground one waits, and reads its prompt 4
    // (64 / 16) tokens a step beside the foreground decode.
    assert_eq!(run(&mut s).admitted, vec![1]);
    assert_eq!(run(&mut s).admitted, vec![2]);
    run(&mut s);
    assert_eq!(s.free_blocks(), 1);
    // 13 tokens need 4 blocks: the batch sequence's 2 and the free one are not enough, so
    // it keeps running and the newcomer waits.
    add(&mut s, 3, 13);
    let st = run(&mut s);
    assert!(st.preempted.is_empty() && st.admitted.is_empty());
    assert_eq!(st.chunks.len(), 2);
    // 12 tokens need 3: enough (neither running sequence needs a new block yet).
    s.remove(3);
    add(&mut s, 5, 12);
    let st = run(&mut s);
    assert_eq!((st.preempted, st.admitted), (vec![2], vec![5]));
}

#[test]
fn out_of_blocks_preempts_the_newest_of_the_tenant_running_the_most() {
    // 6 blocks of 4 positions, full: tenant 7 runs seqs 1 and 2 (next position 7: fits),
    // tenant 9 runs seq 3, admitted after them (next position 8: needs a block).
    let mut s = sched(4, 64, 6);
    for (id, len, tenant) in [(1, 6, 7), (2, 6, 7), (3, 8, 9)] {
        add(&mut s, id, len);
        s.set_tenant(id, tenant);
        if id == 2 {
            assert_eq!(run(&mut s).admitted, vec![1, 2]);
        }
    }
    assert_eq!(run(&mut s).admitted, vec![3]);
    assert_eq!(s.free_blocks(), 0);
    // Seq 3, the newest, is not the one preempted: seq 2, tenant 7's newest, is, though
    // its position fitted and was planned first. Seq 3 then gets its block this step.
    let st = s.schedule();
    assert_eq!(st.preempted, vec![2]);
    let planned: Vec<(SeqId, usize)> = st.chunks.iter().map(|c| (c.id, c.start)).collect();
    assert_eq!(planned, vec![(1, 7), (3, 8)]);
}

#[test]
fn a_foreground_sequence_gives_up_its_copy_before_a_background_ones_blocks() {
    // Five blocks of 4: a cached prefix (two full blocks and a partial one), a running
    // background sequence's block and one free. The next turn needs two more blocks: giving
    // up the copy of the partial block frees one, so no background sequence gives its up.
    let mut s = sched_cached(4, 64, 5, true);
    add(&mut s, 1, 10);
    run(&mut s);
    s.remove(1);
    add(&mut s, 9, 3);
    s.set_tenant(9, batch());
    run(&mut s);
    let mut next = prompt(1, 10);
    next.extend([7, 8, 9, 10, 11, 12]);
    s.add(2, &next, true);
    let st = s.schedule();
    assert!(st.preempted.is_empty(), "{:?}", st.preempted);
    assert!(st.copies.is_empty(), "{:?}", st.copies);
    let starts: Vec<(SeqId, usize)> = st.chunks.iter().map(|c| (c.id, c.start)).collect();
    assert_eq!(starts, vec![(9, 3), (2, 8)]);
}
