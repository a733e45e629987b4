//! Checking a signed request (`halfmq_proto::auth`): the user's proof, the
//! request time within `max_request_age_ms` of the broker's clock, and a
//! nonce not seen before within that window (the replay cache). Pure but
//! for the replay cache's lock: the caller passes `now_ms`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use foldhash::HashSet;
use halfmq_proto::auth::{self, KEY_BYTES, MEMBER_USER};

use super::users::Users;

/// Who a request comes from, once its signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user.
    User(Arc<str>),
    /// Another member of the broker group (signed with the group's secret).
    Member,
}

impl Principal {
    /// The name for the audit log.
    pub fn name(&self) -> &str {
        match self {
            Principal::User(u) => u,
            Principal::Member => MEMBER_USER,
        }
    }
}

/// Why a request was not authenticated. Its message never says whether
/// the user exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No or malformed signature headers.
    Unsigned(&'static str),
    /// The request time is outside the window.
    Stale {
        /// The window, ms either side of the broker's clock.
        max_age_ms: u64,
    },
    /// Unknown user or wrong proof (the same answer for both).
    BadProof,
    /// A valid signature seen before.
    Replayed,
    /// The replay cache is full (too many signed requests within the window).
    Busy,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unsigned(why) => write!(
                f,
                "authentication required: this broker takes only signed requests ({why})"
            ),
            Refusal::Stale { max_age_ms } => write!(
                f,
                "authentication failed: the request time is more than {max_age_ms} ms from the broker's clock (check the client's clock)"
            ),
            Refusal::BadProof => f.write_str("authentication failed: unknown user or wrong secret"),
            Refusal::Replayed => f.write_str("authentication failed: this signed request was seen before (replay)"),
            Refusal::Busy => f.write_str("too many signed requests within max_request_age_ms (replay cache full); retry"),
        }
    }
}

/// The signature headers of a request.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// `x-halfmq-user`.
    pub user: &'a str,
    /// `x-halfmq-time`.
    pub time: &'a str,
    /// `x-halfmq-nonce`.
    pub nonce: &'a str,
    /// `x-halfmq-proof`.
    pub proof: &'a str,
}

/// Nonces seen within the window, oldest first.
#[derive(Debug, Default)]
struct Replay {
    seen: HashSet<[u8; 16]>,
    /// (forget at, ms; nonce), in insertion order.
    order: VecDeque<(u64, [u8; 16])>,
}

/// Checks signatures against the users (and the group's secret).
#[derive(Debug)]
pub struct Verifier {
    users: Arc<Users>,
    member_key: Option<[u8; KEY_BYTES]>,
    max_age_ms: u64,
    max_nonces: usize,
    replay: Mutex<Replay>,
    /// Stands in for the stored key of an unknown user, so that an unknown
    /// name costs the same work as a wrong secret.
    decoy: [u8; KEY_BYTES],
}

impl Verifier {
    /// A verifier of `users`' signatures (and of members', signed with the
    /// group secret `member_secret`), accepting request times within
    /// `max_age_ms` of the clock and remembering at most `max_nonces`
    /// nonces.
    pub fn new(
        users: Arc<Users>,
        member_secret: Option<&str>,
        max_age_ms: u64,
        max_nonces: usize,
    ) -> Verifier {
        Verifier {
            users,
            member_key: member_secret.map(|s| auth::stored_key(&auth::client_key(MEMBER_USER, s))),
            max_age_ms,
            max_nonces,
            replay: Mutex::new(Replay::default()),
            decoy: rand::random(),
        }
    }

    /// The users checked against.
    pub fn users(&self) -> &Arc<Users> {
        &self.users
    }

    /// The window of request times, ms either side of the clock.
    pub fn max_age_ms(&self) -> u64 {
        self.max_age_ms
    }

    /// Checks the signature of a request to `path` at `now_ms`.
    ///
    /// # Errors
    /// The [`Refusal`].
    pub fn verify(&self, path: &str, s: Signed<'_>, now_ms: u64) -> Result<Principal, Refusal> {
        let time: u64 = s
            .time
            .parse()
            .map_err(|_| Refusal::Unsigned("x-halfmq-time is not ms since the epoch"))?;
        let nonce = auth::unhex::<16>(s.nonce)
            .ok_or(Refusal::Unsigned("x-halfmq-nonce is not 32 hex digits"))?;
        let proof = auth::unhex::<KEY_BYTES>(s.proof)
            .ok_or(Refusal::Unsigned("x-halfmq-proof is not 64 hex digits"))?;
        if time.abs_diff(now_ms) > self.max_age_ms {
            return Err(Refusal::Stale {
                max_age_ms: self.max_age_ms,
            });
        }
        let (key, principal) = if s.user == MEMBER_USER {
            (self.member_key, Principal::Member)
        } else {
            (
                self.users.stored_key(s.user),
                Principal::User(Arc::from(s.user)),
            )
        };
        let known = key.is_some();
        let key = key.unwrap_or(self.decoy);
        let canonical = auth::canonical(path, s.user, time, s.nonce);
        if !auth::verify(&key, &canonical, &proof) || !known {
            return Err(Refusal::BadProof);
        }
        self.remember(nonce, time.saturating_add(self.max_age_ms), now_ms)?;
        Ok(principal)
    }

    /// Records a nonce until `forget_at_ms`.
    fn remember(&self, nonce: [u8; 16], forget_at_ms: u64, now_ms: u64) -> Result<(), Refusal> {
        let mut r = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(at, n)) = r.order.front() {
            if at > now_ms {
                break;
            }
            r.order.pop_front();
            r.seen.remove(&n);
        }
        if r.seen.contains(&nonce) {
            return Err(Refusal::Replayed);
        }
        if r.seen.len() >= self.max_nonces {
            return Err(Refusal::Busy);
        }
        r.seen.insert(nonce);
        r.order.push_back((forget_at_ms, nonce));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::users::{stored_key_hex, Change, Limits};

    const PATH: &str = "/halfmq.v1.Producer/Send";

    fn setup(max_nonces: usize) -> (tempfile::TempDir, Verifier) {
        let dir = tempfile::tempdir().unwrap();
        let meta = halfmq_storage::Meta::open(dir.path()).unwrap();
        let limits = Limits {
            max_users: 10,
            max_rules_per_user: 10,
        };
        let users = Arc::new(Users::load(&meta, limits).unwrap());
        let ck = auth::client_key("alice", "alice's secret!!");
        users
            .apply(
                &Change::CreateUser {
                    name: "alice".into(),
                    stored_key: stored_key_hex(&ck),
                    created_ms: 0,
                    rocketmq_key: None,
                },
                &meta,
            )
            .unwrap();
        (
            dir,
            Verifier::new(users, Some("group secret"), 60_000, max_nonces),
        )
    }

    struct Req {
        user: String,
        time: String,
        nonce: String,
        proof: String,
    }

    fn sign(user: &str, secret: &str, time: u64, nonce: u8) -> Req {
        let nonce = auth::hex(&[nonce; 16]);
        let c = auth::canonical(PATH, user, time, &nonce);
        Req {
            user: user.into(),
            time: time.to_string(),
            proof: auth::hex(&auth::proof(&auth::client_key(user, secret), &c)),
            nonce,
        }
    }

    fn check(v: &Verifier, r: &Req, now: u64) -> Result<Principal, Refusal> {
        let s = Signed {
            user: &r.user,
            time: &r.time,
            nonce: &r.nonce,
            proof: &r.proof,
        };
        v.verify(PATH, s, now)
    }

    #[test]
    fn good_stale_wrong_unknown_and_replayed_requests() {
        let (_d, v) = setup(100);
        let now = 1_000_000;
        let ok = sign("alice", "alice's secret!!", now, 1);
        assert_eq!(check(&v, &ok, now), Ok(Principal::User("alice".into())));
        assert_eq!(check(&v, &ok, now + 10), Err(Refusal::Replayed));
        let stale = sign("alice", "alice's secret!!", now - 60_001, 2);
        assert!(matches!(check(&v, &stale, now), Err(Refusal::Stale { .. })));
        let future = sign("alice", "alice's secret!!", now + 60_001, 3);
        assert!(matches!(
            check(&v, &future, now),
            Err(Refusal::Stale { .. })
        ));
        let wrong = sign("alice", "not the secret!!", now, 4);
        assert_eq!(check(&v, &wrong, now), Err(Refusal::BadProof));
        let unknown = sign("mallory", "alice's secret!!", now, 5);
        assert_eq!(check(&v, &unknown, now), Err(Refusal::BadProof));
        // Refused requests burn no nonce: the right signature with nonce 4 passes.
        let right4 = sign("alice", "alice's secret!!", now, 4);
        assert!(check(&v, &right4, now).is_ok());
        let member = sign(MEMBER_USER, "group secret", now, 6);
        assert_eq!(check(&v, &member, now), Ok(Principal::Member));
        let mut bad = sign("alice", "alice's secret!!", now, 7);
        bad.nonce = "xyz".into();
        assert!(matches!(check(&v, &bad, now), Err(Refusal::Unsigned(_))));
    }

    #[test]
    fn nonces_are_forgotten_after_the_window_and_the_cache_is_bounded() {
        let (_d, v) = setup(2);
        let now = 1_000_000;
        assert!(check(&v, &sign("alice", "alice's secret!!", now, 1), now).is_ok());
        assert!(check(&v, &sign("alice", "alice's secret!!", now, 2), now).is_ok());
        assert_eq!(
            check(&v, &sign("alice", "alice's secret!!", now, 3), now),
            Err(Refusal::Busy)
        );
        // Past the window the first two are forgotten; nonce 1 at a fresh time passes.
        let later = now + 60_001;
        assert!(check(&v, &sign("alice", "alice's secret!!", later, 1), later).is_ok());
    }
}
