//! The `[auth]` and `[tls]` sections of the broker's configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// A secret read from the environment: never serialized, never printed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> SecretString {
        SecretString(s.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretString(..)")
    }
}

/// Shortest secret accepted from the environment, bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// `[auth]`: authentication and authorization (README "Security").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Every request must be signed by a user, and is allowed only as the
    /// user's policy says (`--auth`). Default false.
    pub enabled: bool,
    /// With auth off, listen on an address that is not loopback anyway
    /// (`--allow-anonymous`): anyone who reaches the port may do anything.
    /// Default false (the broker then refuses to start there).
    pub allow_anonymous: bool,
    /// A signed request is accepted only if its time is within this much
    /// of the broker's clock, either way; its nonce is remembered that
    /// long, ms. Default 300,000 (Kerberos' default clock skew).
    #[serde(deserialize_with = "crate::units::ms")]
    pub max_request_age_ms: u64,
    /// Most nonces remembered (about 50 bytes each); while it is full,
    /// signed requests are refused as busy. Default 4,000,000 (13,000
    /// requests a second over the default window: the bench's rate is a
    /// few thousand requests a second, since sends are batched).
    pub max_replay_nonces: u64,
    /// Most users. Default 10,000.
    pub max_users: u32,
    /// Most rules per user. Default 256.
    pub max_rules_per_user: u32,
    /// After 3 failed authentications on one connection, each further
    /// failure is answered after 100 ms, doubling up to this, ms. Default
    /// 5,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub failure_delay_max_ms: u64,
    /// The first admin's secret, from `HALFMQ_ADMIN_SECRET` (never from
    /// a file or a flag).
    #[serde(skip)]
    pub admin_secret: Option<SecretString>,
    /// The broker group's shared secret, from `HALFMQ_CLUSTER_SECRET`: its
    /// members sign their replication RPCs with it.
    #[serde(skip)]
    pub cluster_secret: Option<SecretString>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            allow_anonymous: false,
            max_request_age_ms: 300_000,
            max_replay_nonces: 4_000_000,
            max_users: 10_000,
            max_rules_per_user: 256,
            failure_delay_max_ms: 5_000,
            admin_secret: None,
            cluster_secret: None,
        }
    }
}

/// `[tls]`: TLS of the listener (rustls).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the broker (`--tls-cert`); empty = no
    /// TLS. Default empty.
    pub cert: PathBuf,
    /// PEM private key of `cert` (`--tls-key`). Default empty.
    pub key: PathBuf,
    /// PEM CA certificates: with it, clients must present a certificate
    /// one of them signed (mTLS, `--tls-client-ca`). Default empty.
    pub client_ca: PathBuf,
    /// PEM CA certificates that the other members' certificates are
    /// checked against when this member connects to them (a broker group
    /// with TLS, `--tls-peer-ca`); with `client_ca` set, this member
    /// presents `cert` to them. Default empty.
    pub peer_ca: PathBuf,
}

impl TlsConfig {
    /// Whether the listener speaks TLS.
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

fn bad(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Checks `[auth]` and `[tls]` against the listen address and whether
/// this broker is a group member.
///
/// # Errors
/// [`ConfigError`] naming the key and why.
pub fn validate(
    auth: &AuthConfig,
    tls: &TlsConfig,
    listen: std::net::SocketAddr,
    group: bool,
) -> Result<(), ConfigError> {
    if !auth.enabled && !auth.allow_anonymous && !listen.ip().is_loopback() {
        return Err(bad(
            "auth.enabled",
            format!(
                "listen {listen} is not a loopback address and auth is off: anyone who reaches the port could send, consume, end other services' transactions and manage the broker. Turn auth on (--auth, [auth] enabled = true) or accept that explicitly ([auth] allow_anonymous = true, --allow-anonymous)"
            ),
        ));
    }
    if auth.enabled {
        if auth.max_request_age_ms == 0 {
            return Err(bad("auth.max_request_age_ms", "must be at least 1 ms"));
        }
        if auth.max_replay_nonces == 0 || auth.max_users == 0 || auth.max_rules_per_user == 0 {
            return Err(bad(
                "auth",
                "max_replay_nonces, max_users and max_rules_per_user must be at least 1",
            ));
        }
        for (name, s) in [
            ("HALFMQ_ADMIN_SECRET", &auth.admin_secret),
            ("HALFMQ_CLUSTER_SECRET", &auth.cluster_secret),
        ] {
            if s.as_ref()
                .is_some_and(|s| s.expose().len() < MIN_SECRET_BYTES)
            {
                return Err(bad(
                    "auth",
                    format!("{name} must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
        }
        if group && auth.cluster_secret.is_none() {
            return Err(bad(
                "auth",
                "a broker group member with auth on needs HALFMQ_CLUSTER_SECRET (the same on every member): members sign their replication RPCs with it",
            ));
        }
    }
    let empty = |p: &PathBuf| p.as_os_str().is_empty();
    if empty(&tls.cert) != empty(&tls.key) {
        return Err(bad(
            "tls",
            "cert and key go together (--tls-cert, --tls-key)",
        ));
    }
    let ca_given = !empty(&tls.client_ca) || !empty(&tls.peer_ca);
    if !tls.enabled() && ca_given {
        return Err(bad("tls", "client_ca and peer_ca need cert and key"));
    }
    if tls.enabled() && group && empty(&tls.peer_ca) {
        return Err(bad(
            "tls.peer_ca",
            "a broker group member with TLS needs the CA of the other members' certificates (--tls-peer-ca)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerConfig;

    #[test]
    fn toml_sections_parse_and_bad_combinations_are_refused() {
        let c = BrokerConfig::from_toml(
            "listen = \"0.0.0.0:8081\"\n[auth]\nenabled = true\nmax_request_age_ms = \"1m\"\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        assert!(c.auth.enabled);
        assert_eq!(c.auth.max_request_age_ms, 60_000);
        assert!(c.tls.enabled());
        let listen: std::net::SocketAddr = "0.0.0.0:8081".parse().unwrap();
        validate(&c.auth, &c.tls, listen, false).unwrap();
        // A group member with auth on needs the members' secret; with TLS, the peers' CA.
        assert_eq!(
            validate(&c.auth, &c.tls, listen, true).unwrap_err().key,
            "auth"
        );
        let mut with_secret = c.auth.clone();
        with_secret.cluster_secret = Some(SecretString::new("sixteen bytes at least"));
        assert_eq!(
            validate(&with_secret, &c.tls, listen, true)
                .unwrap_err()
                .key,
            "tls.peer_ca"
        );
        with_secret.cluster_secret = Some(SecretString::new("short"));
        assert!(validate(&with_secret, &c.tls, listen, false)
            .unwrap_err()
            .reason
            .contains("16 bytes"));
        let half = TlsConfig {
            cert: "c.pem".into(),
            ..TlsConfig::default()
        };
        assert_eq!(
            validate(&c.auth, &half, listen, false).unwrap_err().key,
            "tls"
        );
        let ca_only = TlsConfig {
            client_ca: "ca.pem".into(),
            ..TlsConfig::default()
        };
        assert_eq!(
            validate(&c.auth, &ca_only, listen, false).unwrap_err().key,
            "tls"
        );
        // Secrets are never printed.
        assert_eq!(
            format!("{:?}", SecretString::new("hunter2")),
            "SecretString(..)"
        );
        assert!(!toml::to_string(&with_secret).unwrap().contains("short"));
        assert!(BrokerConfig::from_toml("[auth]\nenabeld = true\n").is_err());
    }
}
