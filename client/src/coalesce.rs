//! Coalesces concurrent calls into batch requests: while up to
//! `max_inflight` batch requests are out, calls queue up, and the next batch
//! takes everything queued (up to `max_items` items / `max_weight` weight).
//! Under low load a call goes out alone at once; under load, batches grow.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::ClientError;

type Waiter<R> = oneshot::Sender<Result<R, ClientError>>;

/// Limits of one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// Most items per batch.
    pub max_items: usize,
    /// Most summed weight (e.g. body bytes) per batch.
    pub max_weight: usize,
    /// Batch requests in flight at once.
    pub max_inflight: usize,
}

/// A handle to a background batching task; the task ends when every handle
/// is dropped.
#[derive(Debug)]
pub(crate) struct Coalescer<T, R> {
    tx: mpsc::Sender<(T, Waiter<R>)>,
}

impl<T, R> Clone for Coalescer<T, R> {
    fn clone(&self) -> Self {
        Coalescer {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// Spawns the batching task. `send` must return one result per item, in
    /// order; `weight` measures an item against `max_weight`.
    pub(crate) fn spawn<F, Fut>(limits: BatchLimits, weight: fn(&T) -> usize, send: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R, ClientError>>> + Send + 'static,
    {
        let (tx, mut rx) =
            mpsc::channel::<(T, Waiter<R>)>(limits.max_items.max(1) * limits.max_inflight.max(1));
        let send = Arc::new(send);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(limits.max_inflight.max(1)));
            while let Some(first) = rx.recv().await {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let mut w = weight(&first.0);
                let mut batch = vec![first];
                while batch.len() < limits.max_items && w < limits.max_weight {
                    match rx.try_recv() {
                        Ok(item) => {
                            w += weight(&item.0);
                            batch.push(item);
                        }
                        Err(_) => break,
                    }
                }
                let send = Arc::clone(&send);
                tokio::spawn(async move {
                    let _permit = permit;
                    let (items, waiters): (Vec<T>, Vec<Waiter<R>>) = batch.into_iter().unzip();
                    let n = waiters.len();
                    let mut results = send(items).await.into_iter();
                    for w in waiters {
                        let r = results.next().unwrap_or_else(|| {
                            Err(ClientError::Connect(format!(
                                "batch answered fewer than {n} results"
                            )))
                        });
                        let _ = w.send(r);
                    }
                });
            }
        });
        Coalescer { tx }
    }

    /// Queues `item` and waits for its result.
    ///
    /// # Errors
    /// The item's error; [`ClientError::Connect`] if the task is gone.
    pub(crate) async fn call(&self, item: T) -> Result<R, ClientError> {
        let (otx, orx) = oneshot::channel();
        self.tx
            .send((item, otx))
            .await
            .map_err(|_| ClientError::Connect("batching task stopped".into()))?;
        orx.await
            .map_err(|_| ClientError::Connect("batching task stopped".into()))?
    }
}
