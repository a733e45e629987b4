//! RocketMQ clients' signed requests: the header
//! `authorization: MQv2-HMAC-SHA1 Credential=AK, SignedHeaders=x-mq-date-time, Signature=HEX`,
//! where the signature is HMAC-SHA1 of the `x-mq-date-time` header's value
//! under the user's RocketMQ secret key (`halfmq user create` prints it).
//! AK is the halfmq user name; a Credential may carry `/...` suffixes,
//! which are ignored; the hex digits are compared case-insensitively (the
//! clients differ) and in constant time.
//!
//! The scheme signs only the time, so a signature can be replayed within
//! `max_request_age_ms` and the request itself is not covered: use TLS
//! where that matters (README "Using RocketMQ clients").

use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use super::users::Users;
use super::verify::Principal;

/// The header carrying the signature.
pub const AUTHORIZATION: &str = "authorization";
/// The signed header: the request's time.
pub const DATE_TIME: &str = "x-mq-date-time";
/// The only scheme served.
const SCHEME: &str = "MQv2-HMAC-SHA1";

/// Why a RocketMQ request was not authenticated (never whether the user
/// exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RocketMqRefusal {
    /// No or malformed signature headers.
    Unsigned(&'static str),
    /// The time is outside the window.
    Stale {
        /// The window, ms either side of the broker's clock.
        max_age_ms: u64,
    },
    /// Unknown user, a user with no RocketMQ key, or a wrong signature.
    BadSignature,
}

impl std::fmt::Display for RocketMqRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RocketMqRefusal::Unsigned(why) => write!(
                f,
                "authentication required: sign requests with a halfmq user's RocketMQ secret key ({why})"
            ),
            RocketMqRefusal::Stale { max_age_ms } => write!(
                f,
                "authentication failed: x-mq-date-time is more than {max_age_ms} ms from the broker's clock"
            ),
            RocketMqRefusal::BadSignature => {
                write!(f, "authentication failed: unknown access key or wrong signature")
            }
        }
    }
}

/// (access key, signature hex) of an authorization header.
fn parse(header: &str) -> Option<(&str, &str)> {
    let rest = header.trim().strip_prefix(SCHEME)?;
    let (mut ak, mut sig) = (None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k.trim() {
            "Credential" => ak = Some(v.trim().split('/').next().unwrap_or_default()),
            "Signature" => sig = Some(v.trim()),
            _ => {}
        }
    }
    Some((ak?, sig?))
}

/// The access key an authorization header names (for logs: never the
/// signature, which is valid for the whole window).
pub fn access_key(header: &str) -> Option<&str> {
    parse(header).map(|(ak, _)| ak)
}

/// The time of an `x-mq-date-time` value, ms since the epoch: the Java and
/// Python clients' `yyyyMMdd'T'HHmmss'Z'` or RFC 3339 (the Rust client).
pub fn parse_date_time(s: &str) -> Option<u64> {
    use time::format_description::well_known::Rfc3339;
    let t = match time::OffsetDateTime::parse(s, &Rfc3339) {
        Ok(t) => t,
        Err(_) => {
            let compact =
                time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
            time::PrimitiveDateTime::parse(s, compact)
                .ok()?
                .assume_utc()
        }
    };
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

fn unhex20(s: &str) -> Option<[u8; 20]> {
    if s.len() != 40 {
        return None;
    }
    let mut out = [0u8; 20];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// HMAC-SHA1 of `msg` under `key`.
pub fn sign(key: &[u8], msg: &[u8]) -> [u8; 20] {
    let mut m = <Hmac<Sha1> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable_key());
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// `new_from_slice` cannot fail for HMAC: it takes keys of every length
/// (longer ones are hashed, shorter ones padded, RFC 2104); the `Result`
/// exists for fixed-key MACs.
#[cold]
fn unreachable_key() -> ! {
    panic!("HMAC-SHA1 accepts keys of every length")
}

/// Checks a RocketMQ request's `authorization` and `x-mq-date-time` at
/// `now_ms` against `users`.
///
/// # Errors
/// The [`RocketMqRefusal`].
pub fn verify(
    users: &Users,
    authorization: Option<&str>,
    date_time: Option<&str>,
    now_ms: u64,
    max_age_ms: u64,
) -> Result<Principal, RocketMqRefusal> {
    let (ak, sig) = authorization
        .and_then(parse)
        .ok_or(RocketMqRefusal::Unsigned(
            "no MQv2-HMAC-SHA1 authorization header",
        ))?;
    if ak.is_empty() {
        return Err(RocketMqRefusal::Unsigned("no access key"));
    }
    let date_time = date_time.ok_or(RocketMqRefusal::Unsigned("no x-mq-date-time header"))?;
    let t = parse_date_time(date_time)
        .ok_or(RocketMqRefusal::Unsigned("x-mq-date-time is not a time"))?;
    if t.abs_diff(now_ms) > max_age_ms {
        return Err(RocketMqRefusal::Stale { max_age_ms });
    }
    let sig = unhex20(sig).ok_or(RocketMqRefusal::Unsigned(
        "the signature is not 40 hex digits",
    ))?;
    // An unknown user costs the same work as a wrong signature.
    let key = users.rocketmq_key(ak);
    let known = key.is_some();
    let key = key.unwrap_or_else(|| "halfmq decoy key".to_owned());
    let want = sign(key.as_bytes(), date_time.as_bytes());
    if !bool::from(want.ct_eq(&sig)) || !known {
        return Err(RocketMqRefusal::BadSignature);
    }
    Ok(Principal::User(std::sync::Arc::from(ak)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::users::{stored_key_hex, Change, Limits};

    fn hexs(b: &[u8], upper: bool) -> String {
        b.iter()
            .map(|x| {
                if upper {
                    format!("{x:02X}")
                } else {
                    format!("{x:02x}")
                }
            })
            .collect()
    }

    #[test]
    fn dates_in_both_client_formats() {
        assert_eq!(parse_date_time("20261204T020802Z"), Some(1_796_350_082_000));
        assert_eq!(
            parse_date_time("2026-12-04T02:08:02.5Z"),
            Some(1_796_350_082_500)
        );
        assert_eq!(
            parse_date_time("2026-12-04T10:08:02+08:00"),
            Some(1_796_350_082_000)
        );
        assert_eq!(parse_date_time("yesterday"), None);
    }

    #[test]
    fn a_signature_checks_out_only_with_the_users_key_and_a_fresh_time() {
        let dir = tempfile::tempdir().unwrap();
        let meta = halfmq_storage::Meta::open(dir.path()).unwrap();
        let users = Users::load(
            &meta,
            Limits {
                max_users: 10,
                max_rules_per_user: 10,
            },
        )
        .unwrap();
        let sk = halfmq_proto::auth::rocketmq_secret_key("alice", "a secret of 16+ bytes");
        users
            .apply(
                &Change::CreateUser {
                    name: "alice".into(),
                    stored_key: stored_key_hex(&halfmq_proto::auth::client_key(
                        "alice",
                        "a secret of 16+ bytes",
                    )),
                    created_ms: 0,
                    rocketmq_key: Some(sk.clone()),
                },
                &meta,
            )
            .unwrap();
        let date = "20261204T020802Z";
        let now = parse_date_time(date).unwrap();
        let sig = sign(sk.as_bytes(), date.as_bytes());
        let header = |ak: &str, sig: &str| {
            format!("MQv2-HMAC-SHA1 Credential={ak}, SignedHeaders=x-mq-date-time, Signature={sig}")
        };
        let check = |h: &str, d: &str, now: u64| verify(&users, Some(h), Some(d), now, 60_000);
        // Both hex cases, and a Credential with a suffix.
        assert!(check(&header("alice", &hexs(&sig, false)), date, now).is_ok());
        assert!(check(&header("alice", &hexs(&sig, true)), date, now + 1000).is_ok());
        assert!(check(&header("alice/cn/rocketmq", &hexs(&sig, true)), date, now).is_ok());
        // Wrong key, unknown user, stale, unsigned: refused alike.
        let bad = sign(b"another key", date.as_bytes());
        assert_eq!(
            check(&header("alice", &hexs(&bad, false)), date, now),
            Err(RocketMqRefusal::BadSignature)
        );
        assert_eq!(
            check(&header("mallory", &hexs(&sig, false)), date, now),
            Err(RocketMqRefusal::BadSignature)
        );
        assert_eq!(
            check(&header("alice", &hexs(&sig, false)), date, now + 120_000),
            Err(RocketMqRefusal::Stale { max_age_ms: 60_000 })
        );
        assert!(matches!(
            verify(&users, None, Some(date), now, 60_000),
            Err(RocketMqRefusal::Unsigned(_))
        ));
        // Python sends an empty Credential when it has no credentials.
        assert!(matches!(
            check(&header("", &hexs(&sig, false)), date, now),
            Err(RocketMqRefusal::Unsigned(_))
        ));
    }
}
