//! Users and policies: [`Security`] (a broker with auth on; every call
//! needs `admin` on `cluster`).

use std::time::Duration;

use halfmq_proto::v1 as pb;

use crate::{check, Client, ClientError, Code};

/// A policy rule: `actions` on the resources `pattern` names (a name, or a
/// prefix ending in `*`; `*` alone is every name), allowed or denied. A
/// matching deny rule overrides every allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `topic`, `group`, `producer-group` or `cluster`.
    pub kind: pb::ResourceKind,
    /// Name or prefix (empty for `cluster`).
    pub pattern: String,
    /// Of `pub`, `sub`, `tx`, `admin`.
    pub actions: Vec<String>,
    /// A deny rule.
    pub deny: bool,
}

impl Rule {
    fn new(kind: pb::ResourceKind, pattern: &str, actions: &[&str]) -> Rule {
        Rule {
            kind,
            pattern: pattern.to_owned(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
            deny: false,
        }
    }

    /// `actions` on topics `pattern`.
    pub fn topic(pattern: &str, actions: &[&str]) -> Rule {
        Rule::new(pb::ResourceKind::ResourceTopic, pattern, actions)
    }

    /// `actions` on consumer groups `pattern`.
    pub fn group(pattern: &str, actions: &[&str]) -> Rule {
        Rule::new(pb::ResourceKind::ResourceGroup, pattern, actions)
    }

    /// `actions` on producer groups `pattern`.
    pub fn producer_group(pattern: &str, actions: &[&str]) -> Rule {
        Rule::new(pb::ResourceKind::ResourceProducerGroup, pattern, actions)
    }

    /// `actions` on the broker itself.
    pub fn cluster(actions: &[&str]) -> Rule {
        Rule::new(pb::ResourceKind::ResourceCluster, "", actions)
    }

    /// The same rule, denying.
    pub fn denied(mut self) -> Rule {
        self.deny = true;
        self
    }

    /// The resource it is about, as the CLI and the audit log write it:
    /// `topic:orders-*`, `cluster`.
    pub fn resource(&self) -> String {
        match self.kind {
            pb::ResourceKind::ResourceCluster => "cluster".to_owned(),
            pb::ResourceKind::ResourceTopic => format!("topic:{}", self.pattern),
            pb::ResourceKind::ResourceGroup => format!("group:{}", self.pattern),
            pb::ResourceKind::ResourceProducerGroup => {
                format!("producer-group:{}", self.pattern)
            }
            pb::ResourceKind::Unspecified => format!("?:{}", self.pattern),
        }
    }

    fn wire(&self) -> pb::Rule {
        pb::Rule {
            kind: self.kind as i32,
            pattern: self.pattern.clone(),
            actions: self.actions.clone(),
            deny: self.deny,
        }
    }
}

/// A user as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// Name.
    pub name: String,
    /// Creation time, broker clock, ms since the epoch.
    pub created_ms: u64,
    /// Rules, in the order granted.
    pub rules: Vec<Rule>,
}

/// Bytes of a generated secret (shown as 64 hex digits).
const SECRET_BYTES: usize = 32;

/// Security calls (users, policies).
#[derive(Debug, Clone)]
pub struct Security {
    client: Client,
}

impl Security {
    /// Security calls over `client`.
    pub fn new(client: Client) -> Security {
        Security { client }
    }

    /// Creates user `name` with a generated secret, returned (64 hex
    /// digits): show it once, the broker cannot tell it again (it keeps
    /// only a key derived one-way from it).
    ///
    /// # Errors
    /// [`Code::UserExists`], [`Code::BadRequest`] for a bad name, transport
    /// errors (`PERMISSION_DENIED` without `admin` on `cluster`).
    pub async fn create_user(&self, name: &str) -> Result<String, ClientError> {
        let secret = halfmq_proto::auth::hex(&rand::random::<[u8; SECRET_BYTES]>());
        self.create_user_with_secret(name, &secret).await?;
        Ok(secret)
    }

    /// Creates user `name` with `secret` (at least 16 bytes).
    ///
    /// # Errors
    /// As [`Security::create_user`]; [`Code::BadRequest`] for a short
    /// secret.
    pub async fn create_user_with_secret(
        &self,
        name: &str,
        secret: &str,
    ) -> Result<(), ClientError> {
        if secret.len() < 16 {
            return Err(ClientError::Broker {
                code: Code::BadRequest,
                message: "a secret has at least 16 bytes".into(),
            });
        }
        let ck = halfmq_proto::auth::client_key(name, secret);
        let req = pb::CreateUserRequest {
            name: name.to_owned(),
            stored_key: halfmq_proto::auth::stored_key(&ck).to_vec().into(),
            rocketmq_secret_key: halfmq_proto::auth::rocketmq_secret_key(name, secret),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.security();
                async move { c.create_user(r).await }
            })
            .await?;
        check(resp.status)
    }

    /// Deletes user `name` and its policy.
    ///
    /// # Errors
    /// [`Code::UserNotFound`], transport errors.
    pub async fn delete_user(&self, name: &str) -> Result<(), ClientError> {
        let req = pb::DeleteUserRequest {
            name: name.to_owned(),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.security();
                async move { c.delete_user(r).await }
            })
            .await?;
        check(resp.status)
    }

    /// Every user with its rules, or only `name`.
    ///
    /// # Errors
    /// [`Code::UserNotFound`] for `name`, transport errors.
    pub async fn list_users(&self, name: Option<&str>) -> Result<Vec<UserInfo>, ClientError> {
        let req = pb::ListUsersRequest {
            name: name.unwrap_or_default().to_owned(),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.security();
                async move { c.list_users(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp
            .users
            .into_iter()
            .map(|u| UserInfo {
                name: u.name,
                created_ms: u.created_ms,
                rules: u
                    .rules
                    .into_iter()
                    .map(|r| Rule {
                        kind: pb::ResourceKind::try_from(r.kind)
                            .unwrap_or(pb::ResourceKind::Unspecified),
                        pattern: r.pattern,
                        actions: r.actions,
                        deny: r.deny,
                    })
                    .collect(),
            })
            .collect())
    }

    /// Adds `rule`'s actions to `user`'s rule of the same resource and
    /// effect. Applies at once, to requests already under way included.
    ///
    /// # Errors
    /// [`Code::UserNotFound`], [`Code::BadRequest`] for an action the
    /// resource cannot have, transport errors.
    pub async fn grant(&self, user: &str, rule: &Rule) -> Result<(), ClientError> {
        let req = pb::GrantRequest {
            user: user.to_owned(),
            rule: Some(rule.wire()),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.security();
                async move { c.grant(r).await }
            })
            .await?;
        check(resp.status)
    }

    /// Removes `rule`'s actions from `user`'s rule of the same resource
    /// and effect (nothing to remove is no error).
    ///
    /// # Errors
    /// As [`Security::grant`].
    pub async fn revoke(&self, user: &str, rule: &Rule) -> Result<(), ClientError> {
        let req = pb::RevokeRequest {
            user: user.to_owned(),
            rule: Some(rule.wire()),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.security();
                async move { c.revoke(r).await }
            })
            .await?;
        check(resp.status)
    }
}
