//! Durations and sizes with units, as flags and TOML values take them.
//!
//! A duration is humantime's form (`500ms`, `30s`, `2m`, `72h`, `1h 30m`);
//! a size is bytesize's (`65536`, `64KiB`, `64MiB`, `1GiB`, `16 MB`: the
//! `i` forms are powers of 1,024, the others of 1,000). In TOML a key ending
//! in `_ms`, `_us` or `_bytes` takes either an integer in that unit or a
//! string with units.

use serde::{Deserialize, Deserializer};

/// Parses a duration with units into milliseconds (sub-millisecond parts
/// are dropped).
///
/// # Errors
/// A message with examples when `s` is not a duration.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s.trim())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .map_err(|e| format!("{s:?} is not a duration ({e}; examples: 500ms, 30s, 2m, 72h)"))
}

/// Parses a duration with units into microseconds.
///
/// # Errors
/// A message with examples when `s` is not a duration.
pub fn parse_duration_us(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s.trim())
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .map_err(|e| format!("{s:?} is not a duration ({e}; examples: 200us, 1ms)"))
}

/// Parses a size: a plain number of bytes, or a number with a unit.
///
/// # Errors
/// A message with examples when `s` is not a size.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size ({e}; examples: 65536, 64KiB, 64MiB, 1GiB)"))
}

/// An integer, or a string for `parse`.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn with_units<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<u64, String>,
    what: &str,
) -> Result<u64, D::Error> {
    match NumberOrText::deserialize(d) {
        Ok(NumberOrText::Number(n)) => Ok(n),
        Ok(NumberOrText::Text(s)) => parse(&s).map_err(serde::de::Error::custom),
        Err(_) => Err(serde::de::Error::custom(format!(
            "expected {what}, as an integer or a string with units"
        ))),
    }
}

/// Serde `deserialize_with` for `*_ms` keys: an integer of milliseconds or
/// a duration string.
///
/// # Errors
/// The deserializer's, naming what was expected.
pub fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    with_units(d, parse_duration_ms, "milliseconds (e.g. 30000 or \"30s\")")
}

/// Serde `deserialize_with` for `*_us` keys.
///
/// # Errors
/// As [`ms`].
pub fn us<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    with_units(d, parse_duration_us, "microseconds (e.g. 300 or \"300us\")")
}

/// Serde `deserialize_with` for `*_bytes` keys.
///
/// # Errors
/// As [`ms`].
pub fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    with_units(d, parse_bytes, "bytes (e.g. 67108864 or \"64MiB\")")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration_ms("2s"), Ok(2000));
        assert_eq!(parse_duration_ms("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration_us("300us"), Ok(300));
        assert!(parse_duration_ms("2 sec ago").is_err());
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("16MB"), Ok(16_000_000));
        assert!(parse_bytes("lots").unwrap_err().contains("64MiB"));
    }
}
