//! Signed requests: the wire contract between a client holding a user's
//! secret and a broker holding only a key derived one-way from it (README
//! "Security"). Modelled on SCRAM-SHA-256 (RFC 5802 / RFC 7677), one proof
//! per request instead of per connection:
//!
//! - `salted = PBKDF2-HMAC-SHA256(secret, "halfmq:" + user, 4096 rounds)`
//! - `client_key = HMAC-SHA256(salted, "Client Key")`
//! - `stored_key = SHA-256(client_key)`: all the broker keeps.
//! - per request, `canonical = "halfmq-v1\n" + path + "\n" + user + "\n" +
//!   time_ms + "\n" + nonce`, and
//!   `proof = client_key XOR HMAC-SHA256(stored_key, canonical)`.
//!
//! The broker recomputes the HMAC from its stored key, recovers the client
//! key from the proof, and accepts when its SHA-256 is the stored key
//! (compared in constant time). The secret never crosses the wire; a copy
//! of the broker's data (stored keys) does not let anyone sign requests.
//! The path is the gRPC method (`/halfmq.v1.Producer/Send`); the time and
//! the nonce let the broker refuse stale and replayed requests. Bodies are
//! not signed: their integrity comes from TLS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Metadata key of the user name.
pub const HEADER_USER: &str = "x-halfmq-user";
/// Metadata key of the request time, decimal ms since the Unix epoch.
pub const HEADER_TIME: &str = "x-halfmq-time";
/// Metadata key of the nonce: 32 hex digits, never repeated by a client.
pub const HEADER_NONCE: &str = "x-halfmq-nonce";
/// Metadata key of the proof: 64 hex digits.
pub const HEADER_PROOF: &str = "x-halfmq-proof";

/// PBKDF2 rounds of the salted secret (RFC 7677's minimum for SCRAM-SHA-256).
pub const PBKDF2_ROUNDS: u32 = 4096;

/// Bytes of a key (client key, stored key, proof).
pub const KEY_BYTES: usize = 32;

/// The user name broker group members sign their replication RPCs with
/// (with the group's shared secret): reserved, no user can be named so.
pub const MEMBER_USER: &str = "%member";

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_BYTES] {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_key(),
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

#[cold]
fn unreachable_key() -> ! {
    panic!("HMAC-SHA256 accepts keys of every length")
}

/// The client key of `user` with `secret` (PBKDF2: about a millisecond in a
/// release build; derive once per client).
pub fn client_key(user: &str, secret: &str) -> [u8; KEY_BYTES] {
    let mut salted = [0u8; KEY_BYTES];
    let salt = format!("halfmq:{user}");
    pbkdf2::pbkdf2_hmac::<Sha256>(
        secret.as_bytes(),
        salt.as_bytes(),
        PBKDF2_ROUNDS,
        &mut salted,
    );
    hmac(&salted, &[b"Client Key"])
}

/// The secret key a user gives RocketMQ clients (their `MQv2-HMAC-SHA1`
/// scheme signs with a key the broker must hold): 64 hex digits, derived
/// from the user's halfmq secret so that it reveals nothing of it, made
/// where the secret is (`halfmq user create`) and sent to the broker,
/// which keeps it to check RocketMQ signatures.
pub fn rocketmq_secret_key(user: &str, secret: &str) -> String {
    let salted = client_key(user, secret);
    hex(&hmac(&salted, &[b"RocketMQ Secret Key"]))
}

/// The stored key of a client key: what the broker keeps of a user.
pub fn stored_key(client_key: &[u8; KEY_BYTES]) -> [u8; KEY_BYTES] {
    Sha256::digest(client_key).into()
}

/// The text a request's proof covers.
pub fn canonical(path: &str, user: &str, time_ms: u64, nonce: &str) -> String {
    format!("halfmq-v1\n{path}\n{user}\n{time_ms}\n{nonce}")
}

/// The proof of a request: `client_key XOR HMAC(stored_key, canonical)`.
pub fn proof(client_key: &[u8; KEY_BYTES], canonical: &str) -> [u8; KEY_BYTES] {
    let sig = hmac(&stored_key(client_key), &[canonical.as_bytes()]);
    xor(client_key, &sig)
}

/// Whether `proof` proves knowledge of the client key whose SHA-256 is
/// `stored_key`, for `canonical` (constant time).
pub fn verify(stored_key: &[u8; KEY_BYTES], canonical: &str, proof: &[u8; KEY_BYTES]) -> bool {
    let sig = hmac(stored_key, &[canonical.as_bytes()]);
    let client_key = xor(proof, &sig);
    let got: [u8; KEY_BYTES] = Sha256::digest(client_key).into();
    got.ct_eq(stored_key).into()
}

fn xor(a: &[u8; KEY_BYTES], b: &[u8; KEY_BYTES]) -> [u8; KEY_BYTES] {
    let mut out = [0u8; KEY_BYTES];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = x ^ y;
    }
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[usize::from(b >> 4)] as char);
        s.push(D[usize::from(b & 15)] as char);
    }
    s
}

/// `N` bytes from exactly `2 * N` hex digits (either case); `None` else.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// Signs every request of a tonic client (an interceptor): adds the four
/// headers for the request's gRPC method, the current time and a fresh
/// nonce (8 random bytes of the signer, then a counter). Cheap to clone;
/// clones share the counter. [`Signer::none`] signs nothing.
#[derive(Clone, Default)]
pub struct Signer {
    inner: Option<Arc<SignerInner>>,
}

struct SignerInner {
    user: String,
    client_key: [u8; KEY_BYTES],
    prefix: [u8; 8],
    counter: AtomicU64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("user", &self.inner.as_ref().map(|i| i.user.as_str()))
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer that adds nothing (auth off).
    pub fn none() -> Signer {
        Signer { inner: None }
    }

    /// A signer for `user` with `secret` (derives the client key once).
    pub fn new(user: &str, secret: &str) -> Signer {
        Signer {
            inner: Some(Arc::new(SignerInner {
                user: user.to_owned(),
                client_key: client_key(user, secret),
                prefix: rand::random(),
                counter: AtomicU64::new(0),
            })),
        }
    }

    /// The user it signs as, if any.
    pub fn user(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.user.as_str())
    }

    /// Adds the signature headers of a request to `path` to `md`.
    pub fn sign(&self, path: &str, md: &mut tonic::metadata::MetadataMap) {
        let Some(i) = &self.inner else { return };
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&i.prefix);
        n[8..].copy_from_slice(&i.counter.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        let nonce = hex(&n);
        let p = proof(&i.client_key, &canonical(path, &i.user, time_ms, &nonce));
        let ascii = |s: String| tonic::metadata::MetadataValue::try_from(s).ok();
        for (k, v) in [
            (HEADER_USER, ascii(i.user.clone())),
            (HEADER_TIME, ascii(time_ms.to_string())),
            (HEADER_NONCE, ascii(nonce)),
            (HEADER_PROOF, ascii(hex(&p))),
        ] {
            if let Some(v) = v {
                md.insert(k, v);
            }
        }
    }
}

impl tonic::service::Interceptor for Signer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.inner.is_some() {
            let path = req
                .extensions()
                .get::<tonic::GrpcMethod>()
                .map(|m| format!("/{}/{}", m.service(), m.method()))
                .unwrap_or_default();
            self.sign(&path, req.metadata_mut());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_key_and_request() {
        let ck = client_key("alice", "a long enough secret");
        let sk = stored_key(&ck);
        let c = canonical(
            "/halfmq.v1.Producer/Send",
            "alice",
            1_700_000_000_000,
            "00ff",
        );
        let p = proof(&ck, &c);
        assert!(verify(&sk, &c, &p));
        // Another request, another user's key, a flipped bit: refused.
        let other = canonical(
            "/halfmq.v1.Admin/DeleteTopic",
            "alice",
            1_700_000_000_000,
            "00ff",
        );
        assert!(!verify(&sk, &other, &p));
        let bob = stored_key(&client_key("bob", "a long enough secret"));
        assert!(!verify(&bob, &c, &p));
        let mut bad = p;
        bad[0] ^= 1;
        assert!(!verify(&sk, &c, &bad));
        // The same secret under another name gives another key (salted).
        assert_ne!(client_key("bob", "a long enough secret"), ck);
    }

    #[test]
    fn hex_round_trips_and_refuses_bad_digits() {
        let k = [0xabu8, 0x01, 0xff];
        assert_eq!(hex(&k), "ab01ff");
        assert_eq!(unhex::<3>("AB01ff"), Some(k));
        assert_eq!(unhex::<3>("ab01f"), None);
        assert_eq!(unhex::<3>("ab01fg"), None);
    }
}
