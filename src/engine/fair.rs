//! Fair admission: the order in which one step offers waiting sequences a place. Each
//! tenant's sequences keep their queue order (a preempted one, at the queue's front, first);
//! next is the head of the tenant with the fewest sequences running, a sequence that ran
//! before ahead of any that never did, and the earlier in the queue on a tie. Built once
//! a step in one pass over the queue; each pick looks at one head per tenant.

use std::collections::{HashMap, VecDeque};

use super::scheduler::SeqId;

/// One tenant's running count and waiting sequences: (queue position, id, ran before).
struct Tenant {
    running: usize,
    waiting: VecDeque<(usize, SeqId, bool)>,
}

pub(super) struct Turns {
    tenants: Vec<Tenant>,
}

impl Turns {
    /// `waiting`: the queue in order, as (id, tenant, ran before); `running`: the tenant of
    /// each running sequence.
    pub(super) fn new(
        waiting: impl Iterator<Item = (SeqId, u64, bool)>,
        running: impl Iterator<Item = u64>,
    ) -> Self {
        let mut slot: HashMap<u64, usize> = HashMap::new();
        let mut tenants: Vec<Tenant> = Vec::new();
        for (pos, (id, tenant, ran)) in waiting.enumerate() {
            let i = *slot.entry(tenant).or_insert_with(|| {
                tenants.push(Tenant {
                    running: 0,
                    waiting: VecDeque::new(),
                });
                tenants.len() - 1
            });
            tenants[i].waiting.push_back((pos, id, ran));
        }
        for tenant in running {
            if let Some(&i) = slot.get(&tenant) {
                tenants[i].running += 1;
            }
        }
        Self { tenants }
    }

    /// The next sequence to offer a place, with its tenant's index for [`Self::take`].
    pub(super) fn next(&self) -> Option<(usize, SeqId)> {
        let heads = self.tenants.iter().enumerate().filter_map(|(i, t)| {
            let &(pos, id, ran) = t.waiting.front()?;
            Some(((!ran, t.running, pos), i, id))
        });
        heads.min().map(|(_, i, id)| (i, id))
    }

    /// Takes tenant `i`'s head off: admitted (now running) or passed over this step.
    pub(super) fn take(&mut self, i: usize, admitted: bool) {
        let t = &mut self.tenants[i];
        t.waiting.pop_front();
        t.running += usize::from(admitted);
    }
}

/// Which running sequence to preempt, given each one's tenant oldest first: the newest of
/// the tenant running the most (a tie: the tenant of the newer one). One tenant: the newest.
pub(super) fn victim(running: impl Iterator<Item = u64>) -> usize {
    // tenant -> (sequences running, index of its newest)
    let mut seen: HashMap<u64, (usize, usize)> = HashMap::new();
    for (i, tenant) in running.enumerate() {
        let e = seen.entry(tenant).or_default();
        *e = (e.0 + 1, i);
    }
    seen.into_values()
        .max()
        .expect("a sequence runs. This is a bug.")
        .1
}

#[cfg(test)]
mod tests {
    use super::{victim, Turns};

    #[test]
    fn the_victim_is_the_newest_of_the_tenant_running_the_most() {
        assert_eq!(victim([5, 5, 5].into_iter()), 2);
        assert_eq!(victim([7, 7, 9].into_iter()), 1);
        assert_eq!(victim([7, 9, 7, 9, 9, 3].into_iter()), 4);
        // A tie: the tenant whose newest is newer.
        assert_eq!(victim([7, 9, 9, 7].into_iter()), 3);
    }

    /// Admits every offer: the order of admission.
    fn order(waiting: &[(u64, u64, bool)], running: &[u64]) -> Vec<u64> {
        let mut t = Turns::new(waiting.iter().copied(), running.iter().copied());
        let mut out = Vec::new();
        while let Some((i, id)) = t.next() {
            t.take(i, true);
            out.push(id);
        }
        out
    }

    #[test]
    fn tenants_take_turns_and_one_alone_keeps_its_order() {
        // Tenant 7 queued 1..=3 before tenant 9's 4; 7 already runs one.
        let w = [(1, 7, false), (2, 7, false), (3, 7, false), (4, 9, false)];
        assert_eq!(order(&w, &[7]), [4, 1, 2, 3]);
        assert_eq!(order(&w, &[]), [1, 4, 2, 3]);
        // One tenant: queue order, whatever runs.
        assert_eq!(order(&w[..3], &[7, 7]), [1, 2, 3]);
        // A sequence that ran before (preempted, at the queue's front) goes first, even
        // from the tenant running more.
        let w = [(5, 7, true), (1, 9, false), (2, 7, false)];
        assert_eq!(order(&w, &[7, 7]), [5, 1, 2]);
    }

    #[test]
    fn a_passed_sequence_lets_its_tenants_next_one_be_offered() {
        let w = [(1, 7, false), (2, 7, false), (3, 9, false)];
        let mut t = Turns::new(w.iter().copied(), [9].into_iter());
        assert_eq!(t.next(), Some((0, 1)));
        t.take(0, false);
        // Passed over, 1 is not counted as running: 7 still runs fewer than 9.
        assert_eq!(t.next(), Some((0, 2)));
        t.take(0, true);
        assert_eq!(t.next(), Some((1, 3)));
        t.take(1, true);
        assert_eq!(t.next(), None);
    }
}
