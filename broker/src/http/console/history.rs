//! The overview's charts: the broker's counters sampled every
//! [`SAMPLE_INTERVAL`], the last [`SAMPLES`] kept (6 minutes), drawn as
//! small SVG line charts of per-second rates.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::Broker;

/// How often the counters are sampled.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 6 minutes at 5 s.
pub(crate) const SAMPLES: usize = 73;

/// One sample of the counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    messages_in: u64,
    messages_out: u64,
    committed: u64,
    bytes_in: u64,
}

/// The last samples.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

/// A named series of per-second rates, oldest first.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: &'static str,
    pub(crate) rates: Vec<f64>,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a sample of `broker`'s counters now.
    pub(crate) fn sample(&self, broker: &Broker) {
        let s = broker.stats();
        let mut q = self.lock();
        if q.len() == SAMPLES {
            q.pop_front();
        }
        q.push_back(Sample {
            at: Instant::now(),
            messages_in: s.messages_in,
            messages_out: s.messages_out,
            committed: s.transactions_committed,
            bytes_in: s.bytes_in,
        });
    }

    /// Per-second rates between consecutive samples.
    pub(crate) fn series(&self) -> Vec<Series> {
        let q = self.lock();
        let pairs: Vec<(Sample, Sample)> = q
            .iter()
            .zip(q.iter().skip(1))
            .map(|(a, b)| (*a, *b))
            .collect();
        let rate = |f: fn(&Sample) -> u64| -> Vec<f64> {
            pairs
                .iter()
                .map(|(a, b)| {
                    let dt = b.at.duration_since(a.at).as_secs_f64().max(0.001);
                    f(b).saturating_sub(f(a)) as f64 / dt
                })
                .collect()
        };
        vec![
            Series {
                name: "messages in /s",
                rates: rate(|s| s.messages_in),
            },
            Series {
                name: "messages out /s",
                rates: rate(|s| s.messages_out),
            },
            Series {
                name: "transactions committed /s",
                rates: rate(|s| s.committed),
            },
            Series {
                name: "bytes in /s",
                rates: rate(|s| s.bytes_in),
            },
        ]
    }
}

/// Samples `broker` into `history` until the broker shuts down.
pub(crate) fn spawn_sampler(broker: Arc<Broker>, history: Arc<History>) {
    let mut stop = broker.shutdown_signal();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => history.sample(&broker),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}

/// An SVG line chart of `rates` (`w` x `h` px); numbers only, nothing to
/// escape.
pub(crate) fn sparkline(rates: &[f64], w: u32, h: u32) -> String {
    let max = rates.iter().copied().fold(0.0_f64, f64::max);
    let n = rates.len();
    let points: Vec<String> = rates
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let x = if n > 1 {
                f64::from(w) * i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            let y = if max > 0.0 {
                f64::from(h) - 2.0 - (f64::from(h) - 4.0) * r / max
            } else {
                f64::from(h) - 2.0
            };
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        "<svg class=\"spark\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\"><polyline fill=\"none\" stroke=\"#2b6cb0\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        points.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_scales_to_its_box() {
        let s = sparkline(&[0.0, 5.0, 10.0], 100, 20);
        assert!(s.contains("points=\"0.0,18.0 50.0,10.0 100.0,2.0\""), "{s}");
        let flat = sparkline(&[0.0, 0.0], 10, 10);
        assert!(flat.contains("0.0,8.0 10.0,8.0"), "{flat}");
    }
}
