//! Scheduler tests: budgets, chunked prefill, mixed steps, preemption, removal. No model.
use super::*;

fn sched(max_batch_size: usize, max_batch_tokens: usize, blocks: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_batch_size,
            max_batch_tokens,
        },
        BlockManager::new(blocks, 4),
    )
}

/// Runs one step, pretending every sequence with logits sampled a token.
fn run(s: &mut Scheduler) -> Step {
    let step = s.schedule();
    let sampled: Vec<SeqId> = step
        .chunks
        .iter()
        .filter(|c| c.logits)
        .map(|c| c.id)
        .collect();
    s.complete(&step, &sampled);
    step
}

#[test]
fn long_prompts_are_chunked_and_decodes_keep_running() {
    let mut s = sched(4, 8, 100);
    s.add(1, 3);
    let st = run(&mut s);
    assert_eq!(
        st.chunks,
        vec![Chunk {
            id: 1,
            start: 0,
            len: 3,
            logits: true
        }]
    );
    assert_eq!(st.admitted, vec![1]);
    s.add(2, 20);
    // Seq 1 decodes one token; seq 2 gets the remaining budget of 7.
    let st = run(&mut s);
    assert_eq!(
        st.chunks[0],
        Chunk {
            id: 1,
            start: 3,
            len: 1,
            logits: true
        }
    );
    assert_eq!(
        st.chunks[1],
        Chunk {
            id: 2,
            start: 0,
            len: 7,
            logits: false
        }
    );
    let st = run(&mut s);
    assert_eq!(
        st.chunks[1],
        Chunk {
            id: 2,
            start: 7,
            len: 7,
            logits: false
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
            logits: true
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
        s.add(id, 5);
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
    s.add(1, 8);
    s.add(2, 8);
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
            logits: true
        }]
    );
    s.complete(&st, &[1]);
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
            logits: true
        }]
    );
    assert!(st.admitted.is_empty(), "seq 2 already ran once");
}

#[test]
fn waiting_sequences_wait_for_blocks_without_deadlock() {
    let mut s = sched(4, 64, 3);
    s.add(1, 10); // 3 blocks
    s.add(2, 4);
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
    s.add(1, 9);
    s.add(2, 30);
    run(&mut s);
    run(&mut s);
    s.remove(2);
    s.remove(1);
    assert!(s.is_idle());
    assert_eq!(s.free_blocks(), 10);
    assert_eq!(s.schedule(), Step::default());
}
