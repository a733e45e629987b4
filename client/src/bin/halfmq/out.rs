//! What the CLI prints: lines on stdout that stop the command quietly when
//! the reader has gone (`halfmq consume ... | head -1`), bodies as text or
//! base64, aligned tables, and one-line error reports.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};

use base64::Engine;

/// The error a write to a closed pipe turns into: `main` exits 0 on it,
/// printing nothing (what was not printed was not acked either).
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
pub struct StdoutClosed;

/// Prints one line on stdout.
///
/// # Errors
/// [`StdoutClosed`] when the reader has gone (EPIPE); other write errors.
pub fn line(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// A body for people and JSON: (text, encoding), the text being the body
/// itself when it is UTF-8 (`utf8`), else its base64 (`base64`).
pub fn body(b: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(b) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(b),
            "base64",
        ),
    }
}

/// A body on one line of text: `body="..."` with newlines and other control
/// characters escaped, or `body(base64)=...` when it is not UTF-8.
pub fn body_field(b: &[u8]) -> String {
    match body(b) {
        (text, "utf8") => format!("body=\"{}\"", text.escape_debug()),
        (text, _) => format!("body(base64)={text}"),
    }
}

/// Rows as columns padded to their widest cell, the first row a header.
pub fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.iter().map(Vec::len).max().unwrap_or(0))
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut cells = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                cells.push_str(cell);
            } else {
                let _ = write!(cells, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(cells.trim_end());
    }
    out
}

/// One line for an error and its causes, each said once (a cause whose text
/// the message already holds is left out).
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for c in e.chain() {
        let text = c.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Whether to colour stderr: only on a terminal, never with `NO_COLOR` set
/// to a non-empty value.
pub fn stderr_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_stay_on_one_line_and_say_their_encoding() {
        assert_eq!(body_field(b"a\nb\"c"), "body=\"a\\nb\\\"c\"");
        assert_eq!(body_field(&[0xff, 0x00]), "body(base64)=/wA=");
        assert_eq!(body(b"hi"), ("hi".to_owned(), "utf8"));
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&[
            vec!["group".into(), "lag".into()],
            vec!["billing-service".into(), "3".into()],
        ]);
        assert_eq!(t, "group            lag\nbilling-service  3");
    }

    #[test]
    fn reports_say_each_cause_once() {
        let e = anyhow::Error::new(std::io::Error::other("refused")).context("connect: refused");
        assert_eq!(report(&e), "connect: refused");
        let e = anyhow::Error::new(std::io::Error::other("why")).context("outer");
        assert_eq!(report(&e), "outer: why");
    }
}
