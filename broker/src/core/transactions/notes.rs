//! The note `tx pending` shows for each pending half: why it is pending
//! and what comes next.

use std::time::Duration;

use crate::core::txcheck::{CheckConfig, HalfState};

/// A broker-clock time for people: RFC 3339, UTC, milliseconds.
pub(crate) fn clock_text(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Why a pending half is still pending, and what comes next, for
/// `tx pending`: every half gets a note.
pub(crate) fn pending_note(
    s: &HalfState,
    group: &str,
    has_session: bool,
    now: u64,
    cfg: &CheckConfig,
) -> String {
    let checks = match s.check_times {
        1 => "1 check".to_owned(),
        n => format!("{n} checks"),
    };
    if s.given_up {
        return format!(
            "given up after {checks} (check_max) went unanswered or answered unknown; \
             resolve with `halfmq tx end TRANSACTION_ID --commit|--rollback`"
        );
    }
    if s.checking {
        return format!(
            "check {} sent to a session of {group}, awaiting its answer until {}",
            s.check_times,
            clock_text(s.due_ms)
        );
    }
    let first_check = s.stored_ms + cfg.transaction_timeout_ms;
    if now < first_check {
        return format!(
            "younger than transaction_timeout ({} ms): first check at {}",
            cfg.transaction_timeout_ms,
            clock_text(first_check.max(s.due_ms))
        );
    }
    if !has_session {
        return format!(
            "no live session of producer group {group}; checks wait for one to open ({checks} so far)"
        );
    }
    if s.check_times == 0 {
        if s.due_ms <= now {
            format!("first check due now, waiting for a session of {group} with room")
        } else {
            format!("first check at {}", clock_text(s.due_ms))
        }
    } else if s.due_ms <= now {
        format!("answered unknown to {checks}; next check due now")
    } else {
        format!(
            "answered unknown (or unanswered) to {checks}; next check at {}",
            clock_text(s.due_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pending_half_gets_a_note() {
        let cfg = CheckConfig {
            transaction_timeout_ms: 6_000,
            check_interval_ms: 30_000,
            check_max: 3,
            check_reply_timeout_ms: 10_000,
        };
        let half = HalfState {
            group: 0,
            topic: 0,
            stored_ms: 1_000,
            check_times: 0,
            due_ms: 7_000,
            checking: false,
            given_up: false,
        };
        let note =
            |s: HalfState, session: bool, now: u64| pending_note(&s, "pg", session, now, &cfg);
        let young = note(half, true, 2_000);
        assert!(young.starts_with("younger than transaction_timeout (6000 ms): first check at 1970-01-01T00:00:07.000Z"), "{young}");
        assert!(note(half, false, 8_000).contains("no live session of producer group pg"));
        assert!(note(half, true, 8_000).contains("first check due now"));
        let checked = HalfState {
            check_times: 2,
            due_ms: 40_000,
            ..half
        };
        assert!(note(checked, true, 20_000)
            .contains("to 2 checks; next check at 1970-01-01T00:00:40.000Z"));
        let out = HalfState {
            checking: true,
            check_times: 1,
            due_ms: 18_000,
            ..half
        };
        assert!(note(out, true, 9_000)
            .starts_with("check 1 sent to a session of pg, awaiting its answer until"));
        let given_up = HalfState {
            given_up: true,
            check_times: 3,
            ..half
        };
        assert!(note(given_up, true, 99_000).contains("given up after 3 checks"));
        for (s, session, now) in [
            (half, true, 2_000),
            (half, false, 8_000),
            (half, true, 8_000),
            (checked, true, 20_000),
            (checked, true, 50_000),
            (out, true, 9_000),
            (given_up, false, 1),
        ] {
            assert!(!note(s, session, now).is_empty());
        }
    }
}
