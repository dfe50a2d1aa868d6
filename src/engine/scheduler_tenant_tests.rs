//! Scheduler tests of tenants: fair admission, whose sequence is preempted, and background
//! sequences giving their places to foreground ones.
use super::*;

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
    let batch = Tenant {
        background: true,
        ..Tenant::from(7)
    };
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
    let batch = Tenant {
        background: true,
        ..Tenant::from(7)
    };
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
