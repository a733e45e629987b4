//! The broker secret: a random 32-byte key, kept in `<data_dir>/broker.secret`
//! (mode 0600), that MACs the ids the broker hands out and takes back —
//! receipt handles and transaction ids — so that they cannot be guessed or
//! forged, and a receipt handle is valid only for the consumer group it was
//! given to.
//!
//! Tags are HMAC-SHA256 truncated to 128 bits (RFC 2104, truncation per
//! RFC 4868 section 2.6 keeps at least half the output), over a domain label
//! and length-prefixed parts, compared in constant time.

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::BrokerError;

/// File name of the secret inside the data directory.
pub const SECRET_FILE: &str = "broker.secret";
/// Bytes of the key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a tag (printed as twice as many hex digits).
pub const TAG_BYTES: usize = 16;

/// What a tag authenticates; each has its own label, so a tag made for one
/// can never pass as another.
#[derive(Debug, Clone, Copy)]
pub enum Domain {
    /// A receipt handle, bound to its consumer group.
    Receipt,
    /// A transaction id.
    Transaction,
}

impl Domain {
    fn label(self) -> &'static [u8] {
        match self {
            Domain::Receipt => b"halfmq receipt handle v1",
            Domain::Transaction => b"halfmq transaction id v1",
        }
    }
}

/// The broker's MAC key. A broker group member replaces it once with the
/// group's (see [`Secret::adopt`]).
pub struct Secret {
    key: std::sync::RwLock<[u8; KEY_BYTES]>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A key from the operating system's random source (not persisted).
    pub fn random() -> Secret {
        Secret {
            key: std::sync::RwLock::new(rand::random()),
        }
    }

    /// The key's bytes (for a broker group's leader to hand to the others).
    pub fn key_bytes(&self) -> [u8; KEY_BYTES] {
        *self.key.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the key with `key` in memory and in `<dir>/broker.secret`
    /// (written to a temporary file, fsynced, renamed): how a broker group
    /// member takes the group's key, so that transaction ids and receipt
    /// handles mean the same on every member.
    ///
    /// # Errors
    /// I/O errors writing the file (the key in memory is unchanged then).
    pub fn adopt(&self, dir: &Path, key: [u8; KEY_BYTES]) -> Result<(), BrokerError> {
        write_key(dir, &key)?;
        *self.key.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// Reads `<dir>/broker.secret`, or creates it (random, 0600, written to a
    /// temporary file, fsynced and renamed into place) when the directory has
    /// none. A restart keeps the key, so transaction ids stay valid.
    ///
    /// # Errors
    /// [`BrokerError::Storage`]-like I/O errors as [`BrokerError::Internal`];
    /// a file of the wrong size is an error, never replaced (ids handed out
    /// with it would silently stop working).
    pub fn load_or_create(dir: &Path) -> Result<Secret, BrokerError> {
        let path = dir.join(SECRET_FILE);
        let io = |what: &str, p: &Path, e: std::io::Error| {
            BrokerError::Internal(format!("{what} {}: {e}", p.display()))
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| {
                    BrokerError::Internal(format!(
                        "{} holds {} bytes, not {KEY_BYTES}: it is damaged; restore it from a backup, or move it away to start with a new secret (outstanding transaction ids and receipt handles then become invalid)",
                        path.display(),
                        bytes.len()
                    ))
                })?;
                Ok(Secret {
                    key: std::sync::RwLock::new(key),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = Secret::random();
                write_key(dir, &s.key_bytes())?;
                Ok(s)
            }
            Err(e) => Err(io("read", &path, e)),
        }
    }

    fn mac(&self, domain: Domain, parts: &[&[u8]]) -> Hmac<Sha256> {
        // new_from_slice accepts any key length for HMAC; 32 bytes never fails.
        let key = self.key_bytes();
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(domain.label());
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m
    }

    /// The tag of `parts` in `domain`.
    pub fn tag(&self, domain: Domain, parts: &[&[u8]]) -> [u8; TAG_BYTES] {
        let full = self.mac(domain, parts).finalize().into_bytes();
        let mut out = [0u8; TAG_BYTES];
        out.copy_from_slice(&full[..TAG_BYTES]);
        out
    }

    /// Whether `tag` is the tag of `parts` in `domain` (constant time).
    pub fn verify(&self, domain: Domain, parts: &[&[u8]], tag: &[u8]) -> bool {
        tag.len() == TAG_BYTES && self.mac(domain, parts).verify_truncated_left(tag).is_ok()
    }
}

/// Writes `key` to `<dir>/broker.secret` (0600, temporary file, fsync,
/// rename, directory fsync).
fn write_key(dir: &Path, key: &[u8; KEY_BYTES]) -> Result<(), BrokerError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        BrokerError::Internal(format!("{what} {}: {e}", p.display()))
    };
    let path = dir.join(SECRET_FILE);
    let tmp: PathBuf = dir.join(format!("{SECRET_FILE}.tmp"));
    {
        let mut f = open_private(&tmp).map_err(|e| io("create", &tmp, e))?;
        f.write_all(key).map_err(|e| io("write", &tmp, e))?;
        f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| io("rename", &tmp, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync", dir, e))
}

#[cfg(unix)]
fn open_private(p: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
}

#[cfg(not(unix))]
fn open_private(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(p)
}

/// Upper-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0F)]));
    }
    s
}

/// Parses exactly `N` bytes of hex (either case).
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_for_their_parts_and_domain() {
        let s = Secret::random();
        let t = s.tag(Domain::Receipt, &[b"g1", b"1.2.3.t"]);
        assert!(s.verify(Domain::Receipt, &[b"g1", b"1.2.3.t"], &t));
        assert!(!s.verify(Domain::Receipt, &[b"g2", b"1.2.3.t"], &t));
        assert!(!s.verify(Domain::Transaction, &[b"g1", b"1.2.3.t"], &t));
        // Length prefixes: moving bytes between parts changes the tag.
        assert!(!s.verify(Domain::Receipt, &[b"g11", b".2.3.t"], &t));
        assert!(!s.verify(Domain::Receipt, &[b"g1", b"1.2.3.t"], &t[..8]));
        let other = Secret::random();
        assert!(!other.verify(Domain::Receipt, &[b"g1", b"1.2.3.t"], &t));
    }

    #[test]
    fn the_secret_survives_a_reopen_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Secret::load_or_create(dir.path()).unwrap();
        let b = Secret::load_or_create(dir.path()).unwrap();
        assert_eq!(a.key_bytes(), b.key_bytes());
        // A member taking its group's key keeps it across a reopen.
        let group = [7u8; KEY_BYTES];
        a.adopt(dir.path(), group).unwrap();
        assert_eq!(a.key_bytes(), group);
        assert_eq!(
            Secret::load_or_create(dir.path()).unwrap().key_bytes(),
            group
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(SECRET_FILE), b"short").unwrap();
        let e = Secret::load_or_create(dir.path()).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert_eq!(
            std::fs::read(dir.path().join(SECRET_FILE)).unwrap(),
            b"short"
        );
    }

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xAB, 0xFF];
        assert_eq!(hex(&b), "0001ABFF");
        assert_eq!(unhex::<4>("0001abff"), Some(b));
        assert_eq!(unhex::<4>("0001ABF"), None);
        assert_eq!(unhex::<4>("0001ABFG"), None);
    }
}
