//! Retry and dead-letter policy: a pure function of a failed delivery.
//!
//! A delivery fails when the consumer nacks it or lets its invisible duration
//! expire. The failure that makes `reconsume_times` reach `n` schedules retry
//! `n` at delay level `n + 2` (1-based, RocketMQ's rule: 10 s, 30 s, 1 m, ...
//! with the default levels), clamped to the last level. A nack's own delay is
//! rounded up to the smallest level at least as long (each level is a FIFO
//! queue, so only level delays can be scheduled). The failure after
//! `max_reconsume_times` retries sends the message to the group's DLQ.

/// RocketMQ's delay levels: 1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h.
pub const DEFAULT_RETRY_DELAYS: &str = "1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h";

/// Retries before the DLQ (RocketMQ's maxReconsumeTimes: 16).
pub const DEFAULT_MAX_RECONSUME_TIMES: u32 = 16;

/// What happens after a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Redeliver through delay level `level` (0-based index), after `delay_ms`.
    Retry {
        /// 0-based level index, also the retry queue id.
        level: u32,
        /// The level's delay, ms.
        delay_ms: u64,
    },
    /// Park it in the group's dead-letter queue.
    DeadLetter,
}

/// The policy: delay levels and the retry budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay of each level, ms, ascending.
    pub delays_ms: Vec<u64>,
    /// Failed deliveries allowed before the DLQ.
    pub max_reconsume_times: u32,
}

impl RetryPolicy {
    /// Decides what follows a failed delivery whose `reconsume_times` was
    /// `failed_reconsume_times` (0 for a first delivery). `custom_delay_ms`
    /// is a nack's own delay (`None`: by level).
    pub fn after_failure(&self, failed_reconsume_times: u32, custom_delay_ms: Option<u64>) -> Step {
        let n = failed_reconsume_times + 1; // the retry number this failure schedules
        if n > self.max_reconsume_times || self.delays_ms.is_empty() {
            return Step::DeadLetter;
        }
        let last = self.delays_ms.len() - 1;
        let level = match custom_delay_ms {
            Some(d) => self.delays_ms.iter().position(|&l| l >= d).unwrap_or(last),
            None => (n as usize + 1).min(last),
        };
        Step::Retry {
            level: level as u32,
            delay_ms: self.delays_ms[level],
        }
    }
}

/// Parses a list like `"1s 5s 10s"` (spaces or commas) into milliseconds.
///
/// # Errors
/// A message naming the bad item, for an empty list, an unparsable item, or
/// a list that is not ascending.
pub fn parse_delays(s: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for item in s.split([' ', ',']).filter(|t| !t.is_empty()) {
        let d = humantime::parse_duration(item).map_err(|e| format!("{item:?}: {e}"))?;
        out.push(d.as_millis() as u64);
    }
    if out.is_empty() {
        return Err("at least one delay level is needed".into());
    }
    if out.windows(2).any(|w| w[0] > w[1]) {
        return Err("delay levels must be ascending".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rocketmq() -> RetryPolicy {
        RetryPolicy {
            delays_ms: parse_delays(DEFAULT_RETRY_DELAYS).unwrap(),
            max_reconsume_times: DEFAULT_MAX_RECONSUME_TIMES,
        }
    }

    #[test]
    fn nth_retry_uses_level_n_plus_2() {
        let p = rocketmq();
        // First failure: retry 1 at level 3 (1-based) = 10 s.
        assert_eq!(
            p.after_failure(0, None),
            Step::Retry {
                level: 2,
                delay_ms: 10_000
            }
        );
        assert_eq!(
            p.after_failure(1, None),
            Step::Retry {
                level: 3,
                delay_ms: 30_000
            }
        );
        assert_eq!(
            p.after_failure(2, None),
            Step::Retry {
                level: 4,
                delay_ms: 60_000
            }
        );
        // Retry 16 would be level 18 = 2 h, the last.
        assert_eq!(
            p.after_failure(15, None),
            Step::Retry {
                level: 17,
                delay_ms: 7_200_000
            }
        );
        // The 17th failure goes to the DLQ.
        assert_eq!(p.after_failure(16, None), Step::DeadLetter);
        // Total of the 16 retries: 4 h 45 m 40 s ("about 4 h 46 m", RocketMQ's docs).
        let total: u64 = (0..16)
            .map(|n| match p.after_failure(n, None) {
                Step::Retry { delay_ms, .. } => delay_ms,
                Step::DeadLetter => 0,
            })
            .sum();
        assert_eq!(total, (4 * 3600 + 45 * 60 + 40) * 1000);
    }

    #[test]
    fn custom_delay_rounds_up_to_a_level() {
        let p = rocketmq();
        assert_eq!(
            p.after_failure(0, Some(0)),
            Step::Retry {
                level: 0,
                delay_ms: 1_000
            }
        );
        assert_eq!(
            p.after_failure(0, Some(7_000)),
            Step::Retry {
                level: 2,
                delay_ms: 10_000
            }
        );
        assert_eq!(
            p.after_failure(0, Some(99_000_000)),
            Step::Retry {
                level: 17,
                delay_ms: 7_200_000
            }
        );
        assert_eq!(
            p.after_failure(16, Some(0)),
            Step::DeadLetter,
            "the budget holds for nacks too"
        );
    }

    #[test]
    fn short_lists_clamp_and_parse_errors_name_the_item() {
        let p = RetryPolicy {
            delays_ms: vec![100, 200],
            max_reconsume_times: 3,
        };
        assert_eq!(
            p.after_failure(0, None),
            Step::Retry {
                level: 1,
                delay_ms: 200
            }
        );
        assert_eq!(
            p.after_failure(2, None),
            Step::Retry {
                level: 1,
                delay_ms: 200
            }
        );
        assert_eq!(p.after_failure(3, None), Step::DeadLetter);
        assert!(parse_delays("1s zz").unwrap_err().contains("zz"));
        assert!(parse_delays("").is_err());
        assert!(parse_delays("5s 1s").is_err());
        assert_eq!(parse_delays("100ms, 1s").unwrap(), vec![100, 1000]);
    }
}
