//! Logging set-up and error reports for the binaries (`halfmq-broker`,
//! `halfmq-bench`).

use std::io::IsTerminal;

/// Whether to colour output on stderr: only on a terminal, and never when
/// `NO_COLOR` is set to a non-empty value (<https://no-color.org>).
pub fn stderr_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Logs to stderr at `RUST_LOG`'s levels (`default` when it is unset or
/// invalid), coloured as [`stderr_colour`] says.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_ansi(stderr_colour())
        .with_writer(std::io::stderr)
        .init();
}

/// One line for an error and its causes, each cause said once: a cause
/// whose text its parent's message already contains is left out.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("storage: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("open meta: {0}")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn each_cause_once() {
        let e = Outer(Inner(std::io::Error::other("locked")));
        assert_eq!(report(&e), "storage: open meta: locked");
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Bare(#[source] std::io::Error);
        assert_eq!(report(&Bare(std::io::Error::other("why"))), "outer: why");
    }
}
