//! The check-back scheduler: a pure state machine over unresolved half
//! messages, driven by events and the caller's `now_ms`. No I/O.
//!
//! Each pending half is keyed by its physical offset in an ordered map (so
//! the smallest, which retention asks for, is O(log n): a scan of a hash map
//! was 6 ms under the transaction lock with 1,000,000 pending) and ordered by
//! the time of its next check in its producer group's `BTreeSet`; a second set orders
//! the groups by their earliest half. Every operation is O(log n), and a group
//! with no live session is parked whole: it leaves the group order in
//! O(log g), however many halves it holds (a million halves of a producer
//! group that died cost one step when they time out, not a million).
//!
//! ```text
//!  add ──► waiting (due = stored + transaction_timeout)
//!            │ due, a live session of its group      │ due, no live session of its group
//!            ▼                                       ▼
//!        checking (attempt counted,             parked: its whole group (no attempt
//!        due = now + check_reply_timeout)        counted, costs nothing; due again, at its
//!                                                own time, when a session of its group
//!                                                opens: unpark_group)
//!            │ answer UNKNOWN or reply timeout
//!            ▼
//!        waiting (due = now + check_interval)  ── after check_max attempts ──► given up
//!  resolve (commit / rollback from anyone) removes the half in every state.
//! ```
//!
//! Given-up halves stay in the index (listed for operators, who can still
//! commit or roll them back) but are never checked again.

use foldhash::{HashMap, HashSet};
use std::collections::{BTreeMap, BTreeSet};

/// Timings and limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckConfig {
    /// A half younger than this is never checked, ms (RocketMQ's
    /// transactionTimeOut: 6 s).
    pub transaction_timeout_ms: u64,
    /// Wait between checks of one half, ms (RocketMQ's
    /// transactionCheckInterval: 30 s).
    pub check_interval_ms: u64,
    /// Delivered checks before the half is given up (RocketMQ's
    /// transactionCheckMax: 15).
    pub check_max: u32,
    /// How long a delivered check may go unanswered before it counts as
    /// UNKNOWN, ms.
    pub check_reply_timeout_ms: u64,
}

/// One pending half. Kept small: this index must hold a million entries in
/// about 200 bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfState {
    /// Interned producer group.
    pub group: u32,
    /// Interned topic.
    pub topic: u32,
    /// Broker clock when stored, ms.
    pub stored_ms: u64,
    /// Checks delivered so far.
    pub check_times: u32,
    /// Next time something is due for it, ms (meaningless when given up).
    pub due_ms: u64,
    /// A check is out and unanswered.
    pub checking: bool,
    /// No more checks; waits for an operator.
    pub given_up: bool,
}

/// What to do with a due half, decided by [`CheckScheduler::next_due`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Send a check for this half (then call [`CheckScheduler::check_sent`]
    /// if a session took it, or [`CheckScheduler::no_session`]).
    Check(u64),
    /// Its last check went unanswered past the reply timeout. The caller
    /// decides: [`CheckScheduler::answered_unknown`] counts it as an UNKNOWN
    /// answer (and may give the half up), [`CheckScheduler::check_lost`]
    /// does not count it and makes the half due at once (another session
    /// takes it). Until one is called the half stays due.
    ReplyTimedOut {
        /// The half.
        offset: u64,
    },
}

/// The scheduler. See the module docs.
#[derive(Debug, Clone)]
pub struct CheckScheduler {
    cfg: CheckConfig,
    halves: BTreeMap<u64, HalfState>,
    /// Per producer group: its halves that are not given up, by (due, offset).
    queues: HashMap<u32, BTreeSet<(u64, u64)>>,
    /// (earliest due, group) of every group with a queued half that is not
    /// parked.
    heads: BTreeSet<(u64, u32)>,
    /// Groups with no live session: their halves are not due.
    parked: HashSet<u32>,
    /// Halves whose check count changed since [`CheckScheduler::take_changed_counts`].
    changed_counts: BTreeSet<u64>,
}

impl CheckScheduler {
    /// An empty scheduler.
    pub fn new(cfg: CheckConfig) -> Self {
        CheckScheduler {
            cfg,
            halves: BTreeMap::new(),
            queues: HashMap::default(),
            heads: BTreeSet::new(),
            parked: HashSet::default(),
            changed_counts: BTreeSet::new(),
        }
    }

    /// The (offset, check count) of the pending halves whose count changed
    /// since the last call (what a broker group's leader replicates).
    pub fn take_changed_counts(&mut self) -> Vec<(u64, u32)> {
        let changed = std::mem::take(&mut self.changed_counts);
        changed
            .into_iter()
            .filter_map(|o| self.halves.get(&o).map(|s| (o, s.check_times)))
            .collect()
    }

    /// Sets a pending half's check count (a broker group member applying
    /// its leader's count); returns whether the half is pending.
    pub fn set_check_times(&mut self, offset: u64, check_times: u32) -> bool {
        match self.halves.get_mut(&offset) {
            Some(s) => {
                s.check_times = check_times;
                true
            }
            None => false,
        }
    }

    /// Number of pending halves (given-up ones included).
    pub fn len(&self) -> usize {
        self.halves.len()
    }

    /// Whether no half is pending.
    pub fn is_empty(&self) -> bool {
        self.halves.is_empty()
    }

    /// The state of one half.
    pub fn get(&self, offset: u64) -> Option<&HalfState> {
        self.halves.get(&offset)
    }

    /// Given-up halves: the pending ones no group queue holds. O(groups).
    pub fn given_up_count(&self) -> usize {
        let queued: usize = self.queues.values().map(BTreeSet::len).sum();
        self.halves.len().saturating_sub(queued)
    }

    /// Halves of `group` that are not given up. O(1).
    pub fn queued_in(&self, group: u32) -> usize {
        self.queues.get(&group).map_or(0, BTreeSet::len)
    }

    /// Every pending half, by physical offset.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &HalfState)> {
        self.halves.iter().map(|(o, s)| (*o, s))
    }

    /// Pending halves from physical offset `from` on, by physical offset.
    /// O(log n) to start.
    pub fn iter_from(&self, from: u64) -> impl Iterator<Item = (u64, &HalfState)> {
        self.halves.range(from..).map(|(o, s)| (*o, s))
    }

    /// The smallest physical offset of a pending half (retention must keep
    /// its segment). O(log n).
    pub fn min_offset(&self) -> Option<u64> {
        self.halves.keys().next().copied()
    }

    /// When the next thing is due, ms (parked groups aside).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.heads.first().map(|(d, _)| *d)
    }

    /// Whether `group` is parked (no live session; see [`CheckScheduler::park`]).
    pub fn is_parked(&self, group: u32) -> bool {
        self.parked.contains(&group)
    }

    fn head_of(&self, group: u32) -> Option<u64> {
        self.queues.get(&group)?.first().map(|(d, _)| *d)
    }

    /// Keeps `heads` in step after `group`'s queue changed from `before`.
    fn fix_head(&mut self, group: u32, before: Option<u64>) {
        if self.parked.contains(&group) {
            return;
        }
        let after = self.head_of(group);
        if before != after {
            if let Some(b) = before {
                self.heads.remove(&(b, group));
            }
            if let Some(a) = after {
                self.heads.insert((a, group));
            }
        }
    }

    fn enqueue(&mut self, group: u32, due_ms: u64, offset: u64) {
        let before = self.head_of(group);
        self.queues
            .entry(group)
            .or_default()
            .insert((due_ms, offset));
        self.fix_head(group, before);
    }

    fn dequeue(&mut self, group: u32, due_ms: u64, offset: u64) {
        let before = self.head_of(group);
        if let Some(q) = self.queues.get_mut(&group) {
            q.remove(&(due_ms, offset));
            if q.is_empty() {
                self.queues.remove(&group);
            }
        }
        self.fix_head(group, before);
    }

    /// A half was stored at `stored_ms`.
    pub fn add(&mut self, offset: u64, group: u32, topic: u32, stored_ms: u64) {
        self.restore(
            offset,
            HalfState {
                group,
                topic,
                stored_ms,
                check_times: 0,
                due_ms: stored_ms + self.cfg.transaction_timeout_ms,
                checking: false,
                given_up: false,
            },
        );
    }

    /// A delayed message stored at `stored_ms`, due at `due_ms`: kept in the
    /// same deadline order as halves (its owner commits it when due).
    pub fn add_at(&mut self, offset: u64, group: u32, topic: u32, stored_ms: u64, due_ms: u64) {
        self.add(offset, group, topic, stored_ms);
        self.reschedule(offset, due_ms);
    }

    /// Puts back a half as it was (restart).
    pub fn restore(&mut self, offset: u64, mut state: HalfState) {
        self.remove(offset);
        state.checking = false;
        if !state.given_up {
            self.enqueue(state.group, state.due_ms, offset);
        }
        self.halves.insert(offset, state);
    }

    /// The half was committed or rolled back; returns its last state.
    pub fn remove(&mut self, offset: u64) -> Option<HalfState> {
        let s = self.halves.remove(&offset)?;
        if !s.given_up {
            self.dequeue(s.group, s.due_ms, offset);
        }
        Some(s)
    }

    fn reschedule(&mut self, offset: u64, due_ms: u64) {
        let Some(s) = self.halves.get_mut(&offset) else {
            return;
        };
        let (group, old, given_up) = (s.group, s.due_ms, s.given_up);
        s.due_ms = due_ms;
        if !given_up {
            self.dequeue(group, old, offset);
            self.enqueue(group, due_ms, offset);
        }
    }

    /// The next half due at `now_ms`, if any (halves of parked groups are
    /// never due). A check whose reply timed out is reported as
    /// [`Due::ReplyTimedOut`] for the caller to settle.
    pub fn next_due(&mut self, now_ms: u64) -> Option<Due> {
        let &(due, group) = self.heads.first()?;
        if due > now_ms {
            return None;
        }
        // invariant: a group in `heads` has a non-empty queue headed by `due`
        let &(_, offset) = self.queues.get(&group)?.first()?;
        // Every queued offset has a state; were one missing, nothing is due.
        let s = *self.halves.get(&offset)?;
        if s.checking {
            return Some(Due::ReplyTimedOut { offset });
        }
        Some(Due::Check(offset))
    }

    /// A session took the check for `offset`: one attempt counted; the reply
    /// is awaited until `now_ms + check_reply_timeout_ms`.
    pub fn check_sent(&mut self, offset: u64, now_ms: u64) {
        if let Some(s) = self.halves.get_mut(&offset) {
            s.check_times += 1;
            s.checking = true;
            self.changed_counts.insert(offset);
        }
        self.reschedule(offset, now_ms + self.cfg.check_reply_timeout_ms);
    }

    /// Looks at the half again at `due_ms` without counting an attempt
    /// (every session of its group was busy).
    pub fn defer(&mut self, offset: u64, due_ms: u64) {
        self.reschedule(offset, due_ms);
    }

    /// No live session could take the check: not an attempt; try again after
    /// the check interval.
    pub fn no_session(&mut self, offset: u64, now_ms: u64) {
        self.reschedule(offset, now_ms + self.cfg.check_interval_ms);
    }

    /// The producer group of `offset` has no live session: not an attempt;
    /// the whole group is parked (none of its halves is due) until
    /// [`CheckScheduler::unpark_group`]. O(log g) for g groups.
    pub fn park(&mut self, offset: u64) {
        if let Some(s) = self.halves.get(&offset) {
            self.park_group(s.group);
        }
    }

    /// Parks `group`; see [`CheckScheduler::park`].
    pub fn park_group(&mut self, group: u32) {
        if let Some(h) = self.head_of(group) {
            if !self.parked.contains(&group) {
                self.heads.remove(&(h, group));
            }
        }
        self.parked.insert(group);
    }

    /// A session of `group` opened: its halves are due again, each at its own
    /// time (those that came due while parked at once). Returns how many
    /// halves wait in the group (not given up).
    pub fn unpark_group(&mut self, group: u32) -> usize {
        if self.parked.remove(&group) {
            if let Some(h) = self.head_of(group) {
                self.heads.insert((h, group));
            }
        }
        self.queues.get(&group).map_or(0, BTreeSet::len)
    }

    /// The session a check was sent to closed without answering: the attempt
    /// is taken back (the producer may never have seen it) and the half is
    /// due again at `now_ms`.
    pub fn check_lost(&mut self, offset: u64, now_ms: u64) {
        let Some(s) = self.halves.get_mut(&offset) else {
            return;
        };
        if !s.checking {
            return;
        }
        s.checking = false;
        s.check_times = s.check_times.saturating_sub(1);
        self.changed_counts.insert(offset);
        self.reschedule(offset, now_ms);
    }

    /// The producer answered UNKNOWN (or the reply timed out). Returns whether
    /// the half is now given up (`check_max` attempts used).
    pub fn answered_unknown(&mut self, offset: u64, now_ms: u64) -> bool {
        let Some(s) = self.halves.get_mut(&offset) else {
            return false;
        };
        if !s.checking {
            return s.given_up; // a late duplicate answer: already handled
        }
        s.checking = false;
        if s.check_times >= self.cfg.check_max {
            s.given_up = true;
            let (group, due) = (s.group, s.due_ms);
            self.dequeue(group, due, offset);
            return true;
        }
        self.reschedule(offset, now_ms + self.cfg.check_interval_ms);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_counts_are_taken_once_and_set_elsewhere() {
        let cfg = CheckConfig {
            transaction_timeout_ms: 10,
            check_interval_ms: 10,
            check_reply_timeout_ms: 10,
            check_max: 5,
        };
        let mut s = CheckScheduler::new(cfg);
        s.add(100, 0, 0, 0);
        s.add(200, 0, 0, 0);
        assert!(s.take_changed_counts().is_empty());
        s.check_sent(100, 20);
        s.check_sent(200, 20);
        s.check_lost(200, 25);
        s.remove(200);
        assert_eq!(s.take_changed_counts(), vec![(100, 1)]);
        assert!(s.take_changed_counts().is_empty());
        // A follower's scheduler takes the leader's count.
        let mut f = CheckScheduler::new(cfg);
        f.add(100, 0, 0, 0);
        assert!(f.set_check_times(100, 3));
        assert!(!f.set_check_times(300, 1));
        assert_eq!(f.get(100).map(|h| h.check_times), Some(3));
        assert!(f.take_changed_counts().is_empty());
    }

    fn cfg() -> CheckConfig {
        CheckConfig {
            transaction_timeout_ms: 6_000,
            check_interval_ms: 30_000,
            check_max: 3,
            check_reply_timeout_ms: 1_000,
        }
    }

    #[test]
    fn nothing_is_checked_before_the_transaction_timeout() {
        let mut s = CheckScheduler::new(cfg());
        s.add(100, 1, 1, 1_000);
        assert_eq!(s.next_due(6_999), None);
        assert_eq!(s.next_due(7_000), Some(Due::Check(100)));
    }

    #[test]
    fn unknown_answers_until_given_up() {
        let mut s = CheckScheduler::new(cfg());
        s.add(100, 1, 1, 0);
        let mut now = 6_000;
        for attempt in 1..=3 {
            assert_eq!(s.next_due(now), Some(Due::Check(100)), "attempt {attempt}");
            s.check_sent(100, now);
            assert_eq!(s.get(100).unwrap().check_times, attempt);
            let given_up = s.answered_unknown(100, now + 10);
            assert_eq!(given_up, attempt == 3);
            now += 10 + 30_000;
        }
        assert!(s.get(100).unwrap().given_up);
        assert_eq!(
            s.next_due(u64::MAX),
            None,
            "given-up halves are never checked"
        );
        assert_eq!(s.len(), 1, "but still listed");
        assert_eq!(s.given_up_count(), 1);
        s.add(200, 1, 1, now);
        assert_eq!(s.given_up_count(), 1, "a fresh half is not given up");
        assert!(s.remove(100).is_some(), "and can be resolved by hand");
        assert_eq!(s.given_up_count(), 0);
    }

    #[test]
    fn min_offset_iteration_order_and_group_counts_follow_resolutions() {
        let mut s = CheckScheduler::new(cfg());
        // Added out of order, as a restart's sled load and replay can.
        for off in [500, 100, 300, 200, 400] {
            s.add(off, (off / 100 % 2) as u32, 1, 0);
        }
        assert_eq!(s.min_offset(), Some(100));
        let order: Vec<u64> = s.iter().map(|(o, _)| o).collect();
        assert_eq!(order, vec![100, 200, 300, 400, 500]);
        assert_eq!((s.queued_in(0), s.queued_in(1)), (2, 3));
        s.remove(100);
        assert_eq!(s.min_offset(), Some(200));
        // A given-up half is still pending (retention keeps it) but leaves
        // its group's queue.
        let now = 6_000;
        assert_eq!(s.next_due(now), Some(Due::Check(200)));
        for _ in 0..3 {
            s.check_sent(200, now);
            s.answered_unknown(200, now);
        }
        assert!(s.get(200).unwrap().given_up);
        assert_eq!(s.min_offset(), Some(200));
        assert_eq!((s.queued_in(0), s.queued_in(1)), (1, 2));
        for off in [200, 300, 400, 500] {
            s.remove(off);
        }
        assert_eq!(s.min_offset(), None);
        assert_eq!((s.queued_in(0), s.queued_in(1)), (0, 0));
    }

    #[test]
    fn no_session_is_not_an_attempt() {
        let mut s = CheckScheduler::new(cfg());
        s.add(100, 1, 1, 0);
        for i in 0..10u64 {
            let now = 6_000 + i * 30_000;
            assert_eq!(s.next_due(now), Some(Due::Check(100)));
            s.no_session(100, now);
        }
        assert_eq!(s.get(100).unwrap().check_times, 0);
        assert!(!s.get(100).unwrap().given_up);
    }

    #[test]
    fn parked_until_a_session_of_the_group_opens() {
        let mut s = CheckScheduler::new(cfg());
        s.add(100, 7, 1, 0);
        s.add(200, 8, 1, 0);
        s.add(300, 7, 1, 0);
        assert_eq!(s.next_due(6_000), Some(Due::Check(100)));
        s.park(100);
        s.park(300);
        assert_eq!(
            s.next_due(1_000_000),
            Some(Due::Check(200)),
            "parked halves are not due"
        );
        s.park(200);
        assert_eq!(s.next_due(u64::MAX), None);
        s.remove(300); // resolved meanwhile (e.g. by an operator)
        assert_eq!(s.unpark_group(7), 1);
        assert_eq!(s.next_due(50_000), Some(Due::Check(100)));
        assert_eq!(
            s.get(100).unwrap().check_times,
            0,
            "parking is not an attempt"
        );
        assert!(s.is_parked(8) && !s.is_parked(7));
    }

    #[test]
    fn one_park_sets_aside_a_whole_group_and_new_halves_join_it() {
        let mut s = CheckScheduler::new(cfg());
        for i in 0..100_000u64 {
            s.add(1_000 + i, 1, 1, i / 100); // group 1: a dead producer's halves
        }
        s.add(500, 2, 1, 2_000); // group 2, due at 8,000
        assert_eq!(s.next_due(7_000), Some(Due::Check(1_000)));
        s.park(1_000);
        assert_eq!(s.next_due(7_000), None, "none of group 1 is due");
        assert_eq!(s.next_due_ms(), Some(8_000));
        assert_eq!(s.next_due(8_000), Some(Due::Check(500)));
        s.remove(500);
        // A half added to the parked group is not due either, however late.
        s.add(7, 1, 1, 9_000);
        assert_eq!(s.next_due(u64::MAX), None);
        assert_eq!(s.next_due_ms(), None);
        // Resolving halves of a parked group keeps it parked.
        s.remove(1_000);
        assert_eq!(s.next_due(u64::MAX), None);
        // A session opens: the earliest is due, then the rest in order.
        assert_eq!(s.unpark_group(1), 100_000);
        assert_eq!(s.next_due(20_000), Some(Due::Check(1_001)));
        s.remove(1_001);
        assert_eq!(s.next_due(20_000), Some(Due::Check(1_002)));
        assert_eq!(s.get(7).unwrap().due_ms, 15_000);
    }

    #[test]
    fn reply_timeout_counts_as_unknown() {
        let mut s = CheckScheduler::new(cfg());
        s.add(100, 1, 1, 0);
        s.check_sent(100, 6_000);
        assert_eq!(s.next_due(6_999), None);
        assert_eq!(s.next_due(7_000), Some(Due::ReplyTimedOut { offset: 100 }));
        assert_eq!(
            s.next_due(7_000),
            Some(Due::ReplyTimedOut { offset: 100 }),
            "due until settled"
        );
        assert!(!s.answered_unknown(100, 7_000));
        assert_eq!(s.get(100).unwrap().due_ms, 37_000);
        // A late UNKNOWN for the same check changes nothing more.
        assert!(!s.answered_unknown(100, 7_500));
        assert_eq!(s.get(100).unwrap().due_ms, 37_000);
    }

    #[test]
    fn a_check_lost_with_its_session_is_not_counted_and_due_at_once() {
        let mut s = CheckScheduler::new(cfg());
        s.add(100, 1, 1, 0);
        s.check_sent(100, 6_000);
        assert_eq!(s.get(100).unwrap().check_times, 1);
        s.check_lost(100, 6_200);
        assert_eq!(s.get(100).unwrap().check_times, 0);
        assert_eq!(s.next_due(6_200), Some(Due::Check(100)));
        // Not checking any more: a late answer or a second loss is ignored.
        s.check_lost(100, 6_300);
        assert!(!s.answered_unknown(100, 6_300));
        assert_eq!(s.get(100).unwrap().due_ms, 6_200);
    }

    #[test]
    fn deadline_order_and_resolution() {
        let mut s = CheckScheduler::new(cfg());
        s.add(300, 1, 1, 2_000);
        s.add(100, 1, 1, 0);
        s.add(200, 1, 1, 1_000);
        assert_eq!(s.min_offset(), Some(100));
        s.remove(100);
        assert_eq!(s.next_due(10_000), Some(Due::Check(200)));
        s.check_sent(200, 10_000);
        assert_eq!(s.next_due(10_000), Some(Due::Check(300)));
        assert_eq!(s.min_offset(), Some(200));
    }

    #[test]
    fn restore_keeps_counts_but_not_the_outstanding_check() {
        let mut s = CheckScheduler::new(cfg());
        let st = HalfState {
            group: 1,
            topic: 2,
            stored_ms: 0,
            check_times: 2,
            due_ms: 50_000,
            checking: true,
            given_up: false,
        };
        s.restore(100, st);
        assert!(!s.get(100).unwrap().checking);
        assert_eq!(s.next_due(50_000), Some(Due::Check(100)));
    }
}
