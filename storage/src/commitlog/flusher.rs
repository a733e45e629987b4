//! The flusher thread: group commit of the active segment, and poisoning
//! after an fdatasync error.

use super::*;
#[derive(Debug, Clone, Default)]
pub(super) struct FlushStatus {
    pub(super) flushed: u64,
    pub(super) error: Option<Arc<str>>,
}

#[derive(Debug, Default)]
pub(super) struct FlushControl {
    pub(super) shutdown: bool,
}

pub(super) fn poison(inner: &Inner, msg: String) {
    tracing::error!(error = %msg, "commit log poisoned; appends refused until restart");
    let msg: Arc<str> = Arc::from(msg);
    *lock(&inner.poison) = Some(Arc::clone(&msg));
    inner
        .status
        .send_modify(|s| s.error = Some(Arc::clone(&msg)));
    let waiting = std::mem::take(&mut lock(&inner.durable_callbacks).waiting);
    for (_, f) in waiting {
        f(Err(Error::Poisoned(msg.to_string())));
    }
}

/// One flush: fdatasync the active segment up to the written offset, publish.
/// Returns whether anything was flushed.
pub(super) fn flush_once(inner: &Inner) -> Result<bool> {
    let (seg, target, records) = {
        let w = lock(&inner.writer);
        (
            Arc::clone(&w.active),
            inner.written.load(Ordering::Acquire),
            inner.records_written.load(Ordering::Relaxed),
        )
    };
    if target <= inner.flushed.load(Ordering::Acquire) {
        return Ok(false);
    }
    let observer = inner.flush_observer.get();
    let started = observer.map(|_| std::time::Instant::now());
    if let Err(e) = seg.sync() {
        poison(inner, e.to_string());
        return Err(e);
    }
    inner.fsyncs.fetch_add(1, Ordering::Relaxed);
    let before = inner.records_flushed.swap(records, Ordering::Relaxed);
    if let (Some(o), Some(t)) = (observer, started) {
        o.flushed(t.elapsed().as_secs_f64(), records.saturating_sub(before));
    }
    inner.flushed.fetch_max(target, Ordering::AcqRel);
    inner
        .status
        .send_modify(|s| s.flushed = s.flushed.max(target));
    run_durable_callbacks(inner);
    Ok(true)
}

/// Runs the [`CommitLog::on_durable`] callbacks the flushed offset covers,
/// in order of their end.
pub(super) fn run_durable_callbacks(inner: &Inner) {
    let flushed = inner.flushed.load(Ordering::Acquire);
    let ready = {
        let mut cbs = lock(&inner.durable_callbacks);
        if cbs.waiting.is_empty() {
            return;
        }
        let rest = cbs.waiting.split_off(&(flushed + 1, 0));
        std::mem::replace(&mut cbs.waiting, rest)
    };
    for (_, f) in ready {
        f(Ok(()));
    }
}

pub(super) fn flusher_loop(inner: &Inner) {
    loop {
        {
            let mut c = lock(&inner.control);
            match inner.flush {
                FlushMode::Sync => loop {
                    if c.shutdown {
                        break;
                    }
                    inner.flusher_sleeping.store(true, Ordering::SeqCst);
                    if inner.written.load(Ordering::SeqCst) > inner.flushed.load(Ordering::Acquire)
                    {
                        inner.flusher_sleeping.store(false, Ordering::SeqCst);
                        break;
                    }
                    // An append that saw `flusher_sleeping` takes this lock
                    // to notify, so it cannot notify before this wait.
                    c = inner.wake.wait(c).unwrap_or_else(|e| e.into_inner());
                    inner.flusher_sleeping.store(false, Ordering::SeqCst);
                },
                FlushMode::Async { interval_ms } => {
                    if !c.shutdown {
                        c = inner
                            .wake
                            .wait_timeout(c, Duration::from_millis(interval_ms))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
            if c.shutdown {
                return; // close() does the last flush
            }
        }
        if lock(&inner.poison).is_some() {
            return;
        }
        if flush_once(inner).is_err() {
            return;
        }
    }
}
