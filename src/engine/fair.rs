//! Fair admission: the order in which one step offers waiting sequences a place. Each
//! tenant's sequences keep their queue order (a preempted one, at the queue's front, first);
//! next is the head of the tenant running the fewest sequences for its weight (a tenant
//! running none first, whatever the weights: no weight starves another tenant), a sequence
//! that ran before ahead of any that never did, and the earlier in the queue on a tie.
//! Background requests form tenants of their own, offered only once no foreground head is
//! left; they are the first preempted, and give their places to foreground ones waiting.
//! Built once a step in one pass over the queue; each pick looks at one head per tenant.

use std::collections::{HashMap, VecDeque};

use super::request::Tenant;
use super::scheduler::SeqId;

/// One tenant's weight, running count and waiting sequences: (queue position, id, ran
/// before).
struct Queue {
    weight: u32,
    background: bool,
    running: usize,
    waiting: VecDeque<(usize, SeqId, bool)>,
}

pub(super) struct Turns {
    tenants: Vec<Queue>,
}

/// `count` sequences of a tenant of `weight`, as a share comparable across tenants.
fn share(count: usize, weight: u32) -> u64 {
    // Scaled so that flooring never ties or inverts two shares of weights up to 100 (they
    // differ by at least 720720 / 100^2 before flooring).
    count as u64 * 720_720 / u64::from(weight.max(1))
}

impl Turns {
    /// `waiting`: the queue in order, as (id, tenant, ran before); `running`: the tenant of
    /// each running sequence.
    pub(super) fn new(
        waiting: impl Iterator<Item = (SeqId, Tenant, bool)>,
        running: impl Iterator<Item = Tenant>,
    ) -> Self {
        let mut slot: HashMap<(u64, bool), usize> = HashMap::new();
        let mut tenants: Vec<Queue> = Vec::new();
        for (pos, (id, tenant, ran)) in waiting.enumerate() {
            let i = *slot
                .entry((tenant.id, tenant.background))
                .or_insert_with(|| {
                    tenants.push(Queue {
                        weight: tenant.weight,
                        background: tenant.background,
                        running: 0,
                        waiting: VecDeque::new(),
                    });
                    tenants.len() - 1
                });
            // A key's weight changed while it waited: its newest request's holds.
            tenants[i].weight = tenant.weight;
            tenants[i].waiting.push_back((pos, id, ran));
        }
        for tenant in running {
            if let Some(&i) = slot.get(&(tenant.id, tenant.background)) {
                tenants[i].running += 1;
            }
        }
        Self { tenants }
    }

    /// The next sequence to offer a place, with its tenant's index for [`Self::take`].
    pub(super) fn next(&self) -> Option<(usize, SeqId)> {
        let heads = self.tenants.iter().enumerate().filter_map(|(i, t)| {
            let &(pos, id, ran) = t.waiting.front()?;
            Some(((t.background, !ran, share(t.running, t.weight), pos), i, id))
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
/// the tenant running the most for its weight (a tie: the tenant of the newer one),
/// background tenants before any other. One tenant: the newest.
pub(super) fn victim(running: impl Iterator<Item = Tenant>) -> usize {
    // (tenant, background) -> (sequences running, index of its newest, weight)
    let mut seen: HashMap<(u64, bool), (usize, usize, u32)> = HashMap::new();
    for (i, tenant) in running.enumerate() {
        let e = seen
            .entry((tenant.id, tenant.background))
            .or_insert((0, 0, tenant.weight));
        *e = (e.0 + 1, i, tenant.weight);
    }
    seen.into_iter()
        .map(|((_, background), (n, newest, weight))| (background, share(n, weight), newest))
        .max()
        .expect("a sequence runs. This is a bug.")
        .2
}

/// Running sequences (indices, newest first) that give their places to waiting foreground
/// ones: the newest background sequence for each foreground one waiting beyond the free
/// places of `places`.
pub(super) fn yielding(
    waiting: impl Iterator<Item = Tenant>,
    running: &[Tenant],
    places: usize,
) -> Vec<usize> {
    let free = places.saturating_sub(running.len());
    let want = waiting
        .filter(|t| !t.background)
        .count()
        .saturating_sub(free);
    let background = running
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, t)| t.background);
    background.map(|(i, _)| i).take(want).collect()
}

#[cfg(test)]
mod tests {
    use super::{victim, Tenant, Turns};

    fn plain(ids: &[u64]) -> impl Iterator<Item = Tenant> + '_ {
        ids.iter().map(|&t| Tenant::from(t))
    }

    #[test]
    fn the_victim_is_the_newest_of_the_tenant_running_the_most() {
        assert_eq!(victim(plain(&[5, 5, 5])), 2);
        assert_eq!(victim(plain(&[7, 7, 9])), 1);
        assert_eq!(victim(plain(&[7, 9, 7, 9, 9, 3])), 4);
        // A tie: the tenant whose newest is newer.
        assert_eq!(victim(plain(&[7, 9, 9, 7])), 3);
    }

    /// Admits every offer: the order of admission.
    fn order(waiting: &[(u64, u64, bool)], running: &[u64]) -> Vec<u64> {
        let waiting = waiting
            .iter()
            .map(|&(id, t, ran)| (id, Tenant::from(t), ran));
        let mut t = Turns::new(waiting, plain(running));
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
        let w = w.iter().map(|&(id, t, ran)| (id, Tenant::from(t), ran));
        let mut t = Turns::new(w, plain(&[9]));
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

#[cfg(test)]
mod weighted {
    use super::{victim, yielding, Tenant, Turns};

    const HEAVY: Tenant = Tenant {
        id: 7,
        weight: 2,
        background: false,
    };
    const LIGHT: Tenant = Tenant {
        id: 9,
        weight: 1,
        background: false,
    };
    /// The light tenant's batch.
    const BATCH: Tenant = Tenant {
        id: 9,
        weight: 1,
        background: true,
    };

    #[test]
    fn a_tenant_of_weight_two_is_admitted_twice_as_often() {
        // Both queue six, alternately; six places: once both run, the heavy one gets two
        // of each three.
        let waiting: Vec<_> = (0..12)
            .map(|i| (i, if i % 2 == 0 { HEAVY } else { LIGHT }, false))
            .collect();
        let mut t = Turns::new(waiting.into_iter(), std::iter::empty());
        let mut got = Vec::new();
        for _ in 0..6 {
            let (i, id) = t.next().unwrap();
            t.take(i, true);
            got.push(id % 2 == 0);
        }
        let heavy = got.iter().filter(|&&h| h).count();
        assert_eq!(heavy, 4, "{got:?}");
    }

    #[test]
    fn no_weight_keeps_a_tenant_running_nothing_waiting() {
        // Weight 100 running 15 of 16: the light tenant running none is next.
        let big = Tenant {
            weight: 100,
            ..HEAVY
        };
        let waiting = [(1, big, false), (2, big, false), (3, LIGHT, false)];
        let t = Turns::new(waiting.into_iter(), std::iter::repeat_n(big, 15));
        assert_eq!(t.next(), Some((1, 3)));
        // The newest waiting request's weight is the tenant's.
        let lighter = Tenant { weight: 1, ..HEAVY };
        let waiting = [(3, LIGHT, false), (1, big, false), (2, lighter, false)];
        let t = Turns::new(waiting.into_iter(), [big, LIGHT].into_iter());
        assert_eq!(t.next(), Some((0, 3)), "one each at weight 1: the earlier");
    }

    #[test]
    fn the_victim_is_the_tenant_running_the_most_for_its_weight() {
        // Heavy runs 3 (1.5 per weight), light 2 (2 per weight): light's newest goes.
        let running = [HEAVY, LIGHT, HEAVY, LIGHT, HEAVY];
        assert_eq!(victim(running.into_iter()), 3);
        // Heavy runs 5 (2.5): heavy's newest.
        let running = [HEAVY, LIGHT, HEAVY, LIGHT, HEAVY, HEAVY, HEAVY];
        assert_eq!(victim(running.into_iter()), 6);
    }

    #[test]
    fn background_requests_wait_for_every_other_and_go_first() {
        // The batch queued first, its own tenant running nothing: still after both others,
        // even the heavy one running the most; then the batch.
        let waiting = [(1, BATCH, false), (2, HEAVY, false), (3, LIGHT, false)];
        let mut t = Turns::new(waiting.into_iter(), [HEAVY, HEAVY, HEAVY].into_iter());
        let mut got = Vec::new();
        while let Some((i, id)) = t.next() {
            t.take(i, true);
            got.push(id);
        }
        assert_eq!(got, [3, 2, 1]);
        // A preempted batch request (ran before) still waits for the foreground.
        let waiting = [(1, BATCH, true), (2, HEAVY, false)];
        let t = Turns::new(waiting.into_iter(), std::iter::empty());
        assert_eq!(t.next(), Some((1, 2)));
        // The batch's newest is preempted first, whoever runs the most.
        let running = [HEAVY, BATCH, HEAVY, HEAVY, BATCH, HEAVY, LIGHT];
        assert_eq!(victim(running.into_iter()), 4);
        assert_eq!(victim([LIGHT, BATCH, LIGHT].into_iter()), 1);
    }

    #[test]
    fn waiting_foreground_sequences_take_background_places() {
        let running = [HEAVY, BATCH, BATCH, LIGHT, BATCH];
        // Two foreground waiting, four places all taken: the two newest batch sequences go.
        let waiting = [LIGHT, BATCH, HEAVY];
        assert_eq!(yielding(waiting.into_iter(), &running, 5), [4, 2]);
        // One place free: one goes. Room for both, or only batches waiting: none.
        assert_eq!(yielding(waiting.into_iter(), &running, 6), [4]);
        assert!(yielding(waiting.into_iter(), &running, 7).is_empty());
        assert!(yielding([BATCH].into_iter(), &running, 5).is_empty());
        // More waiting than there are batch sequences: every one of them.
        assert_eq!(yielding([LIGHT; 5].into_iter(), &running, 5), [4, 2, 1]);
        assert!(yielding([LIGHT].into_iter(), &[HEAVY, LIGHT], 2).is_empty());
    }
}
