//! Background work of a running broker: the periodic checkpoint (consumer
//! progress, transaction state, store checkpoint), retention, and the
//! check-back driver. These are the services that, with replication, run on
//! the leader only; the state they act on is the core's.

pub mod check_back;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::core::{lock, Broker};
use crate::error::BrokerError;

/// A broker group member's leadership: takes it up when openraft makes this
/// member the serving leader of a new term (progress reloaded), gives it up
/// when it is not any more, sends the leader's progress record every
/// `checkpoint_interval_ms` and its retention records.
async fn leadership_watch(b: Arc<Broker>) {
    let mut stop = b.shutdown_tx.subscribe();
    let mut last_progress = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.changed() => return,
        }
        let Some(r) = b.replication() else { return };
        let term = r.repl.term();
        let held = b.leader_term.load(std::sync::atomic::Ordering::Acquire);
        if r.repl.serving() {
            if held != term && !b.group_secret_adopted() {
                // A new group: its first leader gives it the MAC key first.
                if let Err(e) = b.propose_group_secret().await {
                    tracing::warn!(error = %e, "the group's key is not stored yet; retrying");
                }
            } else if held != term {
                let b2 = Arc::clone(&b);
                match tokio::task::spawn_blocking(move || b2.take_up_leadership(term)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "could not take up leadership; retrying")
                    }
                    Err(e) => tracing::error!(error = %e, "taking up leadership panicked"),
                }
            } else if b.admin_bootstrap().is_some() {
                if let Err(e) = b.bootstrap_group().await {
                    tracing::warn!(error = %e, "the first admin is not stored yet; retrying");
                }
            } else if last_progress.elapsed() >= Duration::from_millis(b.cfg.checkpoint_interval_ms)
            {
                last_progress = tokio::time::Instant::now();
                if let Err(e) = b.propose_progress().await {
                    tracing::warn!(error = %e, "progress record not stored");
                }
                if let Err(e) = b.propose_check_counts().await {
                    tracing::warn!(error = %e, "check-count record not stored");
                }
            } else if let Err(e) = b.propose_retention().await {
                tracing::warn!(error = %e, "retention record not stored");
            }
        } else if held != 0 {
            b.leader_term.store(0, std::sync::atomic::Ordering::Release);
            tracing::info!(term = held, "no longer the broker group's leader");
        }
    }
}

impl Broker {
    /// Starts the periodic checkpoint and retention tasks and the check driver.
    pub fn start_background(self: &Arc<Self>) {
        // The first save comes one interval after start-up (the state was
        // just loaded); retention runs at once (a restart may find expired
        // segments on a disk that is short of space).
        let checkpoint =
            self.spawn_periodic(self.cfg.checkpoint_interval_ms, false, "checkpoint", |b| {
                b.save_state()
            });
        let retention = self.spawn_periodic(
            self.cfg.retention_check_interval_ms,
            true,
            "retention",
            |b| b.apply_retention().map(|_| ()),
        );
        let mut tasks = lock(&self.tasks);
        tasks.push(checkpoint);
        tasks.push(retention);
        let stop = self.shutdown_tx.subscribe();
        tasks.push(tokio::spawn(check_back::check_driver(
            Arc::clone(self),
            stop,
        )));
        if self.replication().is_some() {
            tasks.push(tokio::spawn(leadership_watch(Arc::clone(self))));
        }
    }

    /// Runs blocking `work` every `every_ms` on the blocking pool until
    /// shutdown, the first time at once when `at_start`, else after
    /// `every_ms`; failures are logged and retried at the next tick.
    pub(crate) fn spawn_periodic(
        self: &Arc<Self>,
        every_ms: u64,
        at_start: bool,
        what: &'static str,
        work: fn(&Broker) -> Result<(), BrokerError>,
    ) -> JoinHandle<()> {
        let b = Arc::clone(self);
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            let period = Duration::from_millis(every_ms);
            let first =
                tokio::time::Instant::now() + if at_start { Duration::ZERO } else { period };
            let mut tick = tokio::time::interval_at(first, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let b2 = Arc::clone(&b);
                match tokio::task::spawn_blocking(move || work(&b2)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, task = what, "periodic task failed"),
                    Err(e) => tracing::error!(error = %e, task = what, "periodic task panicked"),
                }
            }
        })
    }

    /// Deletes expired segments, never one holding an unresolved half, then
    /// forgets saved resolutions of deleted halves.
    ///
    /// # Errors
    /// Storage errors.
    pub fn apply_retention(&self) -> Result<Vec<u64>, BrokerError> {
        if let Some(r) = self.replication() {
            // The leader proposes the boundary; every member deletes
            // behind it once applied (`%RETAIN%` records).
            self.group_retention(r)?;
            return Ok(Vec::new());
        }
        let min_pending = self.tx.min_pending_offset();
        let deleted = self.store.apply_retention(self.clock.now_ms(), &|s| {
            min_pending.is_none_or(|m| s.end <= m)
        })?;
        if !deleted.is_empty() {
            self.tx
                .prune_resolved(&self.store, self.store.log().min_offset())?;
        }
        Ok(deleted)
    }
}
