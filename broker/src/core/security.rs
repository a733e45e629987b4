//! The security state in the broker: users and policies change through
//! [`Broker::change_security`] (at once on a single broker, through the
//! log in a broker group: `%AUTH%` records, applied by every member), and
//! the first admin is made from `HALFMQ_ADMIN_SECRET`.

use std::sync::Arc;

use bytes::Bytes;
use halfmq_storage::{Record, RecordKind};

use super::Broker;
use crate::auth::users::{stored_key_hex, Change, Users};
use crate::error::BrokerError;

/// System topic of security changes in a broker group's log; body: the
/// [`Change`] as JSON.
pub(crate) const AUTH_TOPIC: &str = "%AUTH%";

/// The record of `c`.
pub(crate) fn auth_record(c: &Change, now_ms: u64) -> Result<Record, BrokerError> {
    let body = serde_json::to_vec(c)
        .map_err(|e| BrokerError::Internal(format!("security change to JSON: {e}")))?;
    Ok(Record {
        kind: RecordKind::System,
        topic: AUTH_TOPIC.to_owned(),
        body: Bytes::from(body),
        store_timestamp_ms: now_ms,
        ..Record::default()
    })
}

impl Broker {
    /// The users and policies (kept whether or not auth is on, so that
    /// turning it on finds them).
    pub fn users(&self) -> &Arc<Users> {
        &self.users
    }

    /// The users to authorize against: `None` with auth off.
    pub fn auth_users(&self) -> Option<&Users> {
        self.cfg.auth.enabled.then_some(&*self.users)
    }

    /// Applies a change of users or policies: checked, then saved at once
    /// (a single broker) or through the broker group's log.
    ///
    /// # Errors
    /// As [`Users::check`]; [`BrokerError::NotLeader`] on a follower;
    /// storage errors.
    pub async fn change_security(&self, c: Change) -> Result<(), BrokerError> {
        self.check_running()?;
        self.check_serving()?;
        self.users.check(&c)?;
        if self.replication().is_none() {
            return self.users.apply(&c, self.store.meta());
        }
        let rec = auth_record(&c, self.now_ms())?;
        self.replicate(vec![rec]).await.map(|_| ())
    }

    /// Applies a committed `%AUTH%` record (every member, in log order).
    pub(crate) fn apply_security(&self, body: &[u8]) {
        let applied = serde_json::from_slice::<Change>(body)
            .map_err(|e| BrokerError::Internal(format!("unreadable security change: {e}")))
            .and_then(|c| self.users.apply(&c, self.store.meta()));
        if let Err(e) = applied {
            // A change the leader checked can still fail here when another
            // applied first (a user deleted meanwhile): it changes nothing.
            tracing::warn!(error = %e, "a replicated security change was not applied");
        }
    }

    /// The first admin's change, when auth is on, no user holds `admin` on
    /// `cluster`, and `HALFMQ_ADMIN_SECRET` was given.
    pub(crate) fn admin_bootstrap(&self) -> Option<Change> {
        let secret = self.cfg.auth.admin_secret.as_ref()?;
        if !self.cfg.auth.enabled || self.users.has_admin() {
            return None;
        }
        let ck = halfmq_proto::auth::client_key(crate::auth::users::ADMIN_USER, secret.expose());
        Some(Change::Bootstrap {
            stored_key: stored_key_hex(&ck),
            created_ms: self.now_ms(),
            rocketmq_key: Some(halfmq_proto::auth::rocketmq_secret_key(
                crate::auth::users::ADMIN_USER,
                secret.expose(),
            )),
        })
    }

    /// A single broker with auth on makes its first admin at start-up.
    ///
    /// # Errors
    /// [`BrokerError::Config`] when no admin exists and
    /// `HALFMQ_ADMIN_SECRET` is not set; storage errors.
    pub(crate) fn bootstrap_single(&self) -> Result<(), BrokerError> {
        if !self.cfg.auth.enabled || !self.cfg.peers.is_empty() || self.users.has_admin() {
            return Ok(());
        }
        let Some(c) = self.admin_bootstrap() else {
            return Err(BrokerError::Config(crate::config::ConfigError {
                key: "auth".into(),
                reason: "auth is on and no admin exists yet: set HALFMQ_ADMIN_SECRET (at least 16 bytes) to create the user `admin`".into(),
            }));
        };
        self.users.apply(&c, self.store.meta())?;
        tracing::info!(target: "halfmq::audit", user = "admin", "first admin created from HALFMQ_ADMIN_SECRET");
        Ok(())
    }

    /// A broker group's leader makes the first admin through the log.
    ///
    /// # Errors
    /// As [`Broker::change_security`].
    pub(crate) async fn bootstrap_group(&self) -> Result<(), BrokerError> {
        match self.admin_bootstrap() {
            Some(c) => {
                let r = self.change_security(c).await;
                if r.is_ok() {
                    tracing::info!(target: "halfmq::audit", user = "admin", "first admin created from HALFMQ_ADMIN_SECRET");
                }
                r
            }
            None => Ok(()),
        }
    }
}
