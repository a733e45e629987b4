//! The dedup index of exactly-once publish: which idempotency keys were
//! stored in the last `dedup_window_ms`, per topic, with the first send's
//! receipt. Pure (no I/O, `now` passed in) and built the same way at run
//! time and from the log at start-up, so that it is a function of the log.
//!
//! A key is identified by SHA-256 of (topic, key) truncated to 128 bits: no
//! strings are kept; 243 bytes of memory per key in all, measured by
//! `examples/dedup_memory.rs` (README). Expiry and the
//! `max_dedup_keys` bound both drop the oldest keys first.

use std::collections::VecDeque;

use foldhash::{HashMap, HashSet};
use halfmq_storage::MessageId;
use sha2::{Digest, Sha256};

/// The identity of an idempotency key within its topic.
pub type KeyId = u128;

/// The identity of `key` on `topic`.
pub fn key_id(topic: &str, key: &str) -> KeyId {
    let mut h = Sha256::new();
    h.update((topic.len() as u64).to_be_bytes());
    h.update(topic.as_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_be_bytes(b)
}

/// What the first send of a key stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstSend {
    /// Physical offset of its record (a half's transaction id is made of
    /// it and the message id).
    pub offset: u64,
    /// Physical offset one past its record: a duplicate is answered once
    /// the log is durable up to here.
    pub end: u64,
    /// Message id.
    pub message_id: MessageId,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset (`None` for halves and delayed messages).
    pub queue_offset: Option<u64>,
    /// When a delayed message falls due (0 for others).
    pub deliver_at_ms: u64,
}

/// What a send with a key should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody has it: this send stores it (and must call `stored` or
    /// `release`).
    Mine,
    /// Stored inside the window: answer with the first send's receipt.
    Duplicate(FirstSend),
    /// Another send is storing it right now: wait for it, then ask again.
    Busy,
}

/// The index.
///
/// Stored keys change only through [`DedupIndex::stored`] and expire by the
/// store times of the records passing through it, so replicas applying the
/// same log build the same index (eviction past `max_keys` included). Claims
/// (keys of sends in flight) are kept apart: they exist only where the sends
/// are being stored (the leader).
#[derive(Debug)]
pub struct DedupIndex {
    window_ms: u64,
    max_keys: usize,
    map: HashMap<KeyId, (u64, FirstSend)>,
    claimed: HashSet<KeyId>,
    /// (time, key) in the order keys were added; an entry whose time no
    /// longer matches the map's is stale and skipped.
    order: VecDeque<(u64, KeyId)>,
    /// [`DedupIndex::claim`] also expires keys by the caller's clock (a
    /// single broker); off for a replica, whose keys expire only by the
    /// store times the log carries.
    expire_on_claim: bool,
    /// Keys dropped before their window ended because of `max_keys`.
    pub evicted: u64,
}

impl DedupIndex {
    /// An empty index keeping keys `window_ms`, at most `max_keys` of them.
    pub fn new(window_ms: u64, max_keys: usize) -> DedupIndex {
        DedupIndex {
            window_ms,
            max_keys: max_keys.max(1),
            map: HashMap::default(),
            claimed: HashSet::default(),
            order: VecDeque::new(),
            expire_on_claim: true,
            evicted: 0,
        }
    }

    /// The index of a replica: keys expire only by the store times of the
    /// records applied ([`DedupIndex::stored`]), never by a local clock.
    pub fn replicated(mut self) -> DedupIndex {
        self.expire_on_claim = false;
        self
    }

    /// Keys stored.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops keys stored `window_ms` or more before `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(t, k)) = self.order.front() {
            if t.saturating_add(self.window_ms) > now_ms {
                break;
            }
            self.order.pop_front();
            if self.map.get(&k).is_some_and(|(mt, _)| *mt == t) {
                self.map.remove(&k);
            }
        }
    }

    fn make_room(&mut self) {
        while self.map.len() >= self.max_keys {
            let Some((t, k)) = self.order.pop_front() else {
                return;
            };
            if self.map.get(&k).is_some_and(|(mt, _)| *mt == t) {
                self.map.remove(&k);
                self.evicted += 1;
            }
        }
    }

    /// The first send of `k`, if it was stored inside the window as seen
    /// at `at_ms`.
    pub fn stored_at(&self, k: KeyId, at_ms: u64) -> Option<FirstSend> {
        self.map
            .get(&k)
            .filter(|(t, _)| t.saturating_add(self.window_ms) > at_ms)
            .map(|(_, f)| *f)
    }

    /// Asks for key `k` at `now_ms`; [`Claim::Mine`] claims it.
    pub fn claim(&mut self, k: KeyId, now_ms: u64) -> Claim {
        if self.expire_on_claim {
            self.expire(now_ms);
        }
        if let Some(f) = self.stored_at(k, now_ms) {
            return Claim::Duplicate(f);
        }
        if !self.claimed.insert(k) {
            return Claim::Busy;
        }
        Claim::Mine
    }

    /// Key `k` was stored at `stored_ms` (its record's store time): how
    /// sends, apply on a replica and start-up's replay of the log record it
    /// (newest wins). Releases a claim of it.
    pub fn stored(&mut self, k: KeyId, stored_ms: u64, first: FirstSend) {
        self.claimed.remove(&k);
        self.expire(stored_ms);
        if !self.map.contains_key(&k) {
            self.make_room();
        }
        self.map.insert(k, (stored_ms, first));
        self.order.push_back((stored_ms, k));
    }

    /// The claimed key `k` was not stored (the send failed, or a replica
    /// stored it through apply): free the claim.
    pub fn release(&mut self, k: KeyId) {
        self.claimed.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(offset: u64) -> FirstSend {
        FirstSend {
            offset,
            end: offset + 10,
            message_id: MessageId([offset as u8; 16]),
            queue_id: 1,
            queue_offset: Some(offset),
            deliver_at_ms: 0,
        }
    }

    #[test]
    fn a_key_is_stored_once_per_window_and_per_topic() {
        let mut d = DedupIndex::new(1_000, 100);
        let k = key_id("t", "k");
        assert_eq!(d.claim(k, 0), Claim::Mine);
        assert_eq!(d.claim(k, 1), Claim::Busy);
        d.stored(k, 5, first(7));
        assert_eq!(d.claim(k, 500), Claim::Duplicate(first(7)));
        assert_eq!(d.claim(key_id("u", "k"), 500), Claim::Mine);
        assert_ne!(key_id("t", "k1"), key_id("t1", "k"));
        // The window counts from the store time.
        assert_eq!(d.claim(k, 1_004), Claim::Duplicate(first(7)));
        assert_eq!(d.claim(k, 1_005), Claim::Mine);
    }

    #[test]
    fn a_released_claim_frees_the_key() {
        let mut d = DedupIndex::new(1_000, 100);
        let k = key_id("t", "k");
        assert_eq!(d.claim(k, 0), Claim::Mine);
        d.release(k);
        assert_eq!(d.claim(k, 1), Claim::Mine);
        d.stored(k, 1, first(1));
        d.release(k); // a stored key is never released
        assert_eq!(d.claim(k, 2), Claim::Duplicate(first(1)));
    }

    #[test]
    fn the_bound_drops_the_oldest_stored_keys() {
        let mut d = DedupIndex::new(1_000_000, 3);
        for i in 0..5u64 {
            let k = key_id("t", &i.to_string());
            assert_eq!(d.claim(k, i), Claim::Mine);
            d.stored(k, i, first(i));
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.evicted, 2);
        assert_eq!(d.claim(key_id("t", "0"), 10), Claim::Mine);
        assert!(matches!(d.claim(key_id("t", "4"), 10), Claim::Duplicate(_)));
    }

    #[test]
    fn replaying_the_same_sends_builds_the_same_index() {
        let build = || {
            let mut d = DedupIndex::new(100, 10);
            for i in 0..50u64 {
                d.stored(key_id("t", &(i % 7).to_string()), i * 3, first(i));
            }
            d.expire(150);
            let mut v: Vec<_> = d.map.iter().map(|(k, v)| (*k, *v)).collect();
            v.sort_by_key(|e| e.0);
            v
        };
        assert_eq!(build(), build());
    }
}
