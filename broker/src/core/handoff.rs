//! Failed deliveries' hand-offs in a broker group, final across a failover.
//!
//! A failed delivery (nack, expiry) is handed to its retry level or the DLQ
//! by one `Redelivery` record, and its offset marked done. On a single
//! broker the mark is in memory and the next checkpoint saves it. In a group
//! the next leader only knows what progress records said, so the mark is
//! made where the hand-off is **applied**, on every member:
//!
//! - the record names its consumer group and source
//!   (`halfmq.consumer_group`, `halfmq.source` = progress queue id and queue
//!   offset);
//! - the serving leader marks the offset done in memory, under the group's
//!   lock, **before** the entry's end is recorded applied;
//! - a follower marks it in the saved progress (sled), if any, and keeps the
//!   mark with the entry's end;
//! - a progress record carries `halfmq.as_of`: the leader's applied end when
//!   it encoded the oldest snapshot in it, read under the group's lock. A
//!   mark whose entry ends after `as_of` may be missing from the record's
//!   snapshots: the follower applies it again on top of them; marks at or
//!   before `as_of` are in them and are forgotten;
//! - a member taking up leadership applies the marks it still holds to the
//!   progress it loads.
//!
//! So the next leader never delivers a handed-off offset again, and a
//! message exhausted before a failover is in the DLQ once.

use foldhash::HashMap;
use halfmq_storage::Record;

use super::progress::{decode_progress, encode_progress, group_key, Groups, GROUPS_SPACE};
use super::props::{prop, prop_u64, AS_OF_PROPERTY, CONSUMER_GROUP_PROPERTY, SOURCE_PROPERTY};
use super::redelivery::RETRY_QUEUE_BIT;
use super::{lock, Broker};

/// Most marks a follower keeps; past it the oldest go (a progress record
/// normally covers them within a checkpoint interval).
const MAX_MARKS: usize = 100_000;

/// A done mark: (consumer group, topic, progress queue id) and the queue
/// offset.
pub(crate) type Mark = (String, String, u32, u64);

/// A follower's marks not yet covered by a progress record.
#[derive(Default)]
pub(crate) struct HandoffMarks {
    /// (group, topic, progress queue id) → (queue offset, end of the entry
    /// that applied the hand-off).
    by_queue: HashMap<(String, String, u32), Vec<(u64, u64)>>,
    count: usize,
}

impl HandoffMarks {
    fn insert(&mut self, m: Mark, end: u64) {
        if self.count >= MAX_MARKS {
            // Drop the oldest mark (lowest end).
            let oldest = self
                .by_queue
                .iter()
                .filter_map(|(k, v)| v.first().map(|(_, e)| (*e, k.clone())))
                .min();
            if let Some((_, k)) = oldest {
                if let Some(v) = self.by_queue.get_mut(&k) {
                    v.remove(0);
                    self.count -= 1;
                    if v.is_empty() {
                        self.by_queue.remove(&k);
                    }
                }
            }
        }
        self.by_queue
            .entry((m.0, m.1, m.2))
            .or_default()
            .push((m.3, end));
        self.count += 1;
    }
}

/// The consumer group and source a Redelivery record names, if it does.
pub(crate) fn source(r: &Record) -> Option<Mark> {
    let group = prop(r, CONSUMER_GROUP_PROPERTY)?;
    let topic = prop(r, super::props::TOPIC_PROPERTY)?;
    let (q, o) = prop(r, SOURCE_PROPERTY)?.split_once(':')?;
    Some((
        group.to_owned(),
        topic.to_owned(),
        q.parse().ok()?,
        o.parse().ok()?,
    ))
}

/// The source properties of a failed delivery from `retry_level` (or the
/// topic's queue `queue_id`) at `queue_offset` in `group`.
pub(crate) fn source_properties(
    group: &str,
    retry_level: Option<u32>,
    queue_id: u32,
    queue_offset: u64,
) -> [(String, String); 2] {
    let q = retry_level.map_or(queue_id, |l| RETRY_QUEUE_BIT | l);
    [
        (CONSUMER_GROUP_PROPERTY.to_owned(), group.to_owned()),
        (SOURCE_PROPERTY.to_owned(), format!("{q}:{queue_offset}")),
    ]
}

/// A progress record's `as_of` (0 for records without it: every mark is
/// applied again on top of them).
pub(crate) fn as_of(r: &Record) -> u64 {
    prop_u64(r, AS_OF_PROPERTY)
}

fn mark_in_memory(groups: &Groups, m: &Mark) {
    // The group's own lock is taken without the map's.
    let Some(gt) = groups.get(&(m.0.clone(), m.1.clone())).cloned() else {
        return;
    };
    mark_one(&gt, m);
}

fn mark_one(gt: &std::sync::Mutex<super::GroupTopic>, m: &Mark) {
    let mut g = lock(gt);
    let (level, queue) = if m.2 & RETRY_QUEUE_BIT != 0 {
        (Some(m.2 & !RETRY_QUEUE_BIT), 0)
    } else {
        (None, m.2)
    };
    if let Some(p) = g.progress_mut(level, queue) {
        p.skip(m.3);
        g.dirty = true;
    }
}

impl Broker {
    /// What an applied entry does to consumer progress: its progress
    /// records (`(body, as_of)`) and hand-offs' done marks, applied before
    /// the entry's `end` is recorded (see the module docs). On the serving
    /// leader progress records are skipped (its own progress is ahead of
    /// them).
    pub(crate) fn apply_progress_changes(
        &self,
        progress: &[(&bytes::Bytes, u64)],
        handoffs: Vec<Mark>,
        end: u64,
    ) {
        if progress.is_empty() && handoffs.is_empty() {
            return;
        }
        let mut marks = lock(&self.handoff_marks);
        if self.check_serving().is_ok() {
            for m in &handoffs {
                let gt = lock(&self.groups).get(&(m.0.clone(), m.1.clone())).cloned();
                if let Some(gt) = gt {
                    mark_one(&gt, m);
                }
            }
            return;
        }
        for m in handoffs {
            self.mark_saved(&m);
            marks.insert(m, end);
        }
        for (body, as_of) in progress {
            self.apply_progress(body, *as_of, &mut marks);
        }
    }

    /// Marks one offset done in the progress saved here, if there is any.
    fn mark_saved(&self, m: &Mark) {
        let key = group_key(&m.0, &m.1, m.2);
        let meta = self.store.meta();
        let Ok(Some(v)) = meta.get(GROUPS_SPACE, &key) else {
            return;
        };
        if let Some(mut p) = decode_progress(&v) {
            p.skip(m.3);
            if let Err(e) = meta.put(GROUPS_SPACE, &key, &encode_progress(&p)) {
                tracing::error!(error = %e, "could not save a hand-off's done mark");
            }
        }
    }

    /// A follower's side of a progress record: the snapshots go to sled
    /// (where taking up leadership reads them), with the marks they may
    /// miss applied again; the marks they cover are forgotten.
    fn apply_progress(&self, body: &[u8], as_of: u64, marks: &mut HandoffMarks) {
        let Some(pairs) = super::replicated::decode_progress_pairs(body) else {
            tracing::error!("an unreadable progress record; skipped");
            return;
        };
        for (k, mut v) in pairs {
            let queue = marks
                .by_queue
                .keys()
                .find(|(g, t, q)| group_key(g, t, *q) == k)
                .cloned();
            if let Some(queue) = queue {
                let held = marks.by_queue.remove(&queue).unwrap_or_default();
                let (covered, later): (Vec<_>, Vec<_>) =
                    held.into_iter().partition(|(_, e)| *e <= as_of);
                marks.count -= covered.len();
                if !later.is_empty() {
                    if let Some(mut p) = decode_progress(&v) {
                        for (qo, _) in &later {
                            p.skip(*qo);
                        }
                        v = encode_progress(&p);
                    }
                    marks.by_queue.insert(queue, later);
                }
            }
            if let Err(e) = self.store.meta().put(GROUPS_SPACE, &k, &v) {
                tracing::error!(error = %e, "could not save replicated consumer progress");
            }
        }
    }

    /// Taking up leadership: the marks still held go into the progress
    /// just loaded, and are forgotten. Called with `handoff_marks` locked
    /// by [`Broker::take_up_leadership`].
    pub(crate) fn apply_held_marks(&self, groups: &Groups, marks: &mut HandoffMarks) {
        for ((g, t, q), held) in marks.by_queue.drain() {
            for (qo, _) in held {
                mark_in_memory(groups, &(g.clone(), t.clone(), q, qo));
            }
        }
        marks.count = 0;
    }
}
