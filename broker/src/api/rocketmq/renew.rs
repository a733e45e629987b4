//! `auto_renew` receives (push consumers): the broker keeps such a
//! delivery invisible while the consumer works on it, renewing its
//! invisible duration before it ends, until the consumer acks it, changes
//! its invisible duration (a push consumer's way to fail it), forwards it
//! to the DLQ, or `max_lease_total_ms` is reached.
//!
//! The consumer keeps the handle it received; each renewal gives the core
//! lease a new one, so this table maps the handle the consumer holds to
//! the current receipt. At most `MAX_RENEWALS` deliveries are renewed at
//! once; beyond that they are delivered without renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::core::types::Receipt;
use crate::core::Broker;

/// Most deliveries renewed at once.
pub(super) const MAX_RENEWALS: usize = 100_000;
/// How often the renewer looks for deliveries to renew, ms.
const TICK_MS: u64 = 500;

#[derive(Debug)]
struct Renewal {
    current: Receipt,
    /// When to renew next, ms since the epoch.
    due_ms: u64,
}

/// The renewed deliveries: (group, handle the consumer holds) -> receipt.
#[derive(Debug, Default)]
pub(super) struct Renewals {
    map: Mutex<HashMap<(String, String), Renewal>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Renewals {
    /// Renews `receipt` (delivered to `group` under `handle`, invisible
    /// until `until_ms`) from now on; false when the table is full.
    pub(super) fn add(
        &self,
        group: &str,
        handle: &str,
        receipt: Receipt,
        until_ms: u64,
        now_ms: u64,
    ) -> bool {
        let mut m = lock(&self.map);
        if m.len() >= MAX_RENEWALS {
            return false;
        }
        // Renew when a third of the duration is left.
        let due_ms = now_ms + until_ms.saturating_sub(now_ms) * 2 / 3;
        m.insert(
            (group.to_owned(), handle.to_owned()),
            Renewal {
                current: receipt,
                due_ms,
            },
        );
        true
    }

    /// The current receipt of a renewed delivery, which stops being renewed.
    pub(super) fn take(&self, group: &str, handle: &str) -> Option<Receipt> {
        lock(&self.map)
            .remove(&(group.to_owned(), handle.to_owned()))
            .map(|r| r.current)
    }

    /// Deliveries being renewed now.
    pub(super) fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// One pass: renews what is due by `invisible_ms` more; forgets what
    /// the core no longer leases (acked by its current handle, expired, or
    /// past `max_lease_total_ms`).
    fn renew_due(&self, broker: &Broker, invisible_ms: u64) {
        let now = broker.now_ms();
        let due: Vec<((String, String), Receipt)> = lock(&self.map)
            .iter()
            .filter(|(_, r)| r.due_ms <= now)
            .map(|(k, r)| (k.clone(), r.current.clone()))
            .collect();
        for (key, receipt) in due {
            let renewed = broker.change_invisible_duration(&key.0, &receipt, invisible_ms);
            let mut m = lock(&self.map);
            match renewed {
                Ok((next, until)) => {
                    if let Some(r) = m.get_mut(&key) {
                        // Not taken meanwhile by an ack of the old handle.
                        if r.current == receipt {
                            r.current = next;
                            r.due_ms = now + until.saturating_sub(now) * 2 / 3;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(group = %key.0, error = %e, "auto renew ends");
                    if m.get(&key).is_some_and(|r| r.current == receipt) {
                        m.remove(&key);
                    }
                }
            }
        }
    }
}

/// Runs the renewer until the broker shuts down.
pub(super) fn spawn(renewals: Arc<Renewals>, broker: Arc<Broker>) {
    let mut stop = broker.shutdown_signal();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let invisible_ms = broker.config().default_invisible_duration_ms;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if renewals.len() > 0 {
                        renewals.renew_due(&broker, invisible_ms);
                    }
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            }
        }
    });
}
