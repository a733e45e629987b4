//! Users and their policies: the deterministic security state. A single
//! broker applies each [`Change`] at once; a broker group applies it when
//! its `%AUTH%` record is committed (`core/security.rs`), so every member
//! holds the same users. Saved in sled, keyspace `users`: name -> the
//! user's JSON ([`User`]). No secret is kept: only each user's stored key
//! (`halfmq_proto::auth`).

use std::sync::{Arc, RwLock};

use foldhash::HashMap;
use halfmq_proto::auth::{hex, unhex, KEY_BYTES};
use halfmq_storage::Meta;
use serde::{Deserialize, Serialize};

use super::policy::{allows, Action, Resource, ResourceKind, Rule};
use crate::error::BrokerError;

/// Keyspace of users in sled.
pub const USERS_SPACE: &str = "users";

/// The first admin's name (its secret comes from `HALFMQ_ADMIN_SECRET`).
pub const ADMIN_USER: &str = "admin";

/// Longest user name, bytes.
pub const MAX_USER_NAME_BYTES: usize = 64;

/// A user: name, stored key (hex) and policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Name.
    pub name: String,
    /// SHA-256 of the user's client key, 64 hex digits.
    pub stored_key: String,
    /// Creation time, broker clock, ms since the epoch.
    pub created_ms: u64,
    /// Policy rules, in the order granted.
    pub rules: Vec<Rule>,
    /// The key RocketMQ clients sign with (`MQv2-HMAC-SHA1`), if the user
    /// has one: a secret, kept only to check their signatures and never
    /// listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rocketmq_key: Option<String>,
}

/// A change of the security state, as saved in `%AUTH%` records (JSON,
/// tagged by `op`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Change {
    /// A new user with no rules.
    CreateUser {
        /// Name.
        name: String,
        /// Stored key, 64 hex digits.
        stored_key: String,
        /// Creation time, ms since the epoch.
        created_ms: u64,
        /// Its RocketMQ key, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rocketmq_key: Option<String>,
    },
    /// A user and its policy go.
    DeleteUser {
        /// Name.
        name: String,
    },
    /// Adds a rule's actions to the user's rule of the same target.
    Grant {
        /// User.
        user: String,
        /// Rule.
        rule: Rule,
    },
    /// Removes a rule's actions from the user's rule of the same target.
    Revoke {
        /// User.
        user: String,
        /// Rule.
        rule: Rule,
    },
    /// The first admin: applied only while no user holds `admin` on
    /// `cluster`; then `admin` gets this key and that rule.
    Bootstrap {
        /// Stored key, 64 hex digits.
        stored_key: String,
        /// Creation time, ms since the epoch.
        created_ms: u64,
        /// Its RocketMQ key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rocketmq_key: Option<String>,
    },
    /// Every user, as a snapshot carries them.
    Replace {
        /// Users.
        users: Vec<User>,
    },
}

/// Limits of the security state (config `[auth]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most users.
    pub max_users: usize,
    /// Most rules per user.
    pub max_rules_per_user: usize,
}

/// The users, in memory, as saved.
#[derive(Debug)]
pub struct Users {
    map: RwLock<HashMap<String, Arc<UserState>>>,
    limits: Limits,
}

/// A user as the hot path reads it.
#[derive(Debug)]
struct UserState {
    user: User,
    key: [u8; KEY_BYTES],
}

/// Checks a user name: 1 to 64 bytes of `[A-Za-z0-9_.@-]`.
///
/// # Errors
/// [`BrokerError::BadRequest`] saying why.
pub fn check_user_name(name: &str) -> Result<(), BrokerError> {
    if name.is_empty()
        || name.len() > MAX_USER_NAME_BYTES
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
    {
        return Err(BrokerError::BadRequest(format!(
            "user name {name:?}: 1 to {MAX_USER_NAME_BYTES} bytes of [A-Za-z0-9_.@-]"
        )));
    }
    Ok(())
}

/// Longest RocketMQ key, bytes.
pub const MAX_ROCKETMQ_KEY_BYTES: usize = 128;

fn check_rocketmq_key(k: Option<&String>) -> Result<(), BrokerError> {
    match k {
        Some(k)
            if k.is_empty()
                || k.len() > MAX_ROCKETMQ_KEY_BYTES
                || !k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(BrokerError::BadRequest(format!(
                "a RocketMQ secret key is 1 to {MAX_ROCKETMQ_KEY_BYTES} printable ASCII bytes"
            )))
        }
        _ => Ok(()),
    }
}

fn parse_key(stored_key: &str) -> Result<[u8; KEY_BYTES], BrokerError> {
    unhex::<KEY_BYTES>(stored_key).ok_or_else(|| {
        BrokerError::BadRequest(format!("a stored key is {KEY_BYTES} bytes (64 hex digits)"))
    })
}

fn state(user: User) -> Result<Arc<UserState>, BrokerError> {
    let key = parse_key(&user.stored_key)?;
    Ok(Arc::new(UserState { user, key }))
}

fn admin_rule() -> Result<Rule, BrokerError> {
    Rule::new(ResourceKind::Cluster, "", &["admin".to_owned()], false)
}

impl Users {
    /// The users saved in `meta`.
    ///
    /// # Errors
    /// Storage errors; a damaged entry is an error naming the user (a
    /// broker must not start with a policy it cannot read).
    pub fn load(meta: &Meta, limits: Limits) -> Result<Users, BrokerError> {
        let mut map = HashMap::default();
        for (k, v) in meta.scan_prefix(USERS_SPACE, b"")? {
            let name = String::from_utf8_lossy(&k).into_owned();
            let user: User = serde_json::from_slice(&v).map_err(|e| {
                BrokerError::Internal(format!("saved user {name:?} cannot be read: {e}"))
            })?;
            map.insert(name, state(user)?);
        }
        Ok(Users {
            map: RwLock::new(map),
            limits,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<UserState>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored key of `name`, if it exists.
    pub fn stored_key(&self, name: &str) -> Option<[u8; KEY_BYTES]> {
        self.read().get(name).map(|u| u.key)
    }

    /// The RocketMQ key of `name`, if it exists and has one.
    pub fn rocketmq_key(&self, name: &str) -> Option<String> {
        self.read()
            .get(name)
            .and_then(|u| u.user.rocketmq_key.clone())
    }

    /// Whether `name` exists and its policy allows `action` on `res`.
    pub fn allows(&self, name: &str, action: Action, res: &Resource<'_>) -> bool {
        self.read()
            .get(name)
            .is_some_and(|u| allows(&u.user.rules, action, res))
    }

    /// Whether some user holds `admin` on `cluster`.
    pub fn has_admin(&self) -> bool {
        self.read()
            .values()
            .any(|u| allows(&u.user.rules, Action::Admin, &Resource::Cluster))
    }

    /// Every user (or the one named), sorted by name.
    pub fn list(&self, name: Option<&str>) -> Vec<User> {
        let mut v: Vec<User> = self
            .read()
            .values()
            .filter(|u| name.is_none_or(|n| u.user.name == n))
            .map(|u| u.user.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The change a snapshot carries: every user.
    pub fn snapshot(&self) -> Change {
        Change::Replace {
            users: self.list(None),
        }
    }

    /// Whether `c` can be applied now (the leader's check before it
    /// proposes; apply checks again).
    ///
    /// # Errors
    /// [`BrokerError::UserExists`], [`BrokerError::UserNotFound`],
    /// [`BrokerError::TooManyRequests`] past `max_users` or
    /// `max_rules_per_user`, [`BrokerError::BadRequest`] for a bad name or
    /// key.
    pub fn check(&self, c: &Change) -> Result<(), BrokerError> {
        let map = self.read();
        match c {
            Change::CreateUser {
                name,
                stored_key,
                rocketmq_key,
                ..
            } => {
                check_user_name(name)?;
                parse_key(stored_key)?;
                check_rocketmq_key(rocketmq_key.as_ref())?;
                if map.contains_key(name) {
                    return Err(BrokerError::UserExists(name.clone()));
                }
                if map.len() >= self.limits.max_users {
                    return Err(BrokerError::TooManyRequests(format!(
                        "max_users {} reached",
                        self.limits.max_users
                    )));
                }
            }
            Change::DeleteUser { name } => {
                if !map.contains_key(name) {
                    return Err(BrokerError::UserNotFound(name.clone()));
                }
            }
            Change::Grant { user, rule } => {
                let u = map
                    .get(user)
                    .ok_or_else(|| BrokerError::UserNotFound(user.clone()))?;
                let merged = u.user.rules.iter().any(|r| r.same_target(rule));
                if !merged && u.user.rules.len() >= self.limits.max_rules_per_user {
                    return Err(BrokerError::TooManyRequests(format!(
                        "user {user} has max_rules_per_user {} rules",
                        self.limits.max_rules_per_user
                    )));
                }
            }
            Change::Revoke { user, .. } => {
                if !map.contains_key(user) {
                    return Err(BrokerError::UserNotFound(user.clone()));
                }
            }
            Change::Bootstrap {
                stored_key,
                rocketmq_key,
                ..
            } => {
                parse_key(stored_key)?;
                check_rocketmq_key(rocketmq_key.as_ref())?;
            }
            Change::Replace { users } => {
                for u in users {
                    check_user_name(&u.name)?;
                    parse_key(&u.stored_key)?;
                }
            }
        }
        Ok(())
    }

    /// Applies `c`: checks it, saves the users it changes in `meta`
    /// (flushed), then updates memory. A change that fails its check
    /// changes nothing.
    ///
    /// # Errors
    /// As [`Users::check`]; storage errors.
    pub fn apply(&self, c: &Change, meta: &Meta) -> Result<(), BrokerError> {
        self.check(c)?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let mut put: Vec<User> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        match c {
            Change::CreateUser {
                name,
                stored_key,
                created_ms,
                rocketmq_key,
            } => put.push(User {
                name: name.clone(),
                stored_key: stored_key.clone(),
                created_ms: *created_ms,
                rules: Vec::new(),
                rocketmq_key: rocketmq_key.clone(),
            }),
            Change::DeleteUser { name } => removed.push(name.clone()),
            Change::Grant { user, rule } => {
                if let Some(u) = map.get(user) {
                    let mut u = u.user.clone();
                    match u.rules.iter_mut().find(|r| r.same_target(rule)) {
                        Some(r) => *r = r.with_added(rule),
                        None => u.rules.push(rule.clone()),
                    }
                    put.push(u);
                }
            }
            Change::Revoke { user, rule } => {
                if let Some(u) = map.get(user) {
                    let mut u = u.user.clone();
                    u.rules = u
                        .rules
                        .iter()
                        .filter_map(|r| {
                            if r.same_target(rule) {
                                r.without(rule)
                            } else {
                                Some(r.clone())
                            }
                        })
                        .collect();
                    put.push(u);
                }
            }
            Change::Bootstrap {
                stored_key,
                created_ms,
                rocketmq_key,
            } => {
                let any_admin = map
                    .values()
                    .any(|u| allows(&u.user.rules, Action::Admin, &Resource::Cluster));
                if !any_admin {
                    let admin = admin_rule()?;
                    let mut rules = map
                        .get(ADMIN_USER)
                        .map(|u| u.user.rules.clone())
                        .unwrap_or_default();
                    rules.retain(|r| !r.same_target(&admin));
                    rules.push(admin);
                    put.push(User {
                        name: ADMIN_USER.to_owned(),
                        stored_key: stored_key.clone(),
                        created_ms: *created_ms,
                        rules,
                        rocketmq_key: rocketmq_key.clone(),
                    });
                }
            }
            Change::Replace { users } => {
                removed.extend(
                    map.keys()
                        .filter(|n| !users.iter().any(|u| &u.name == *n))
                        .cloned(),
                );
                put.extend(users.iter().cloned());
            }
        }
        let states: Vec<Arc<UserState>> = put.into_iter().map(state).collect::<Result<_, _>>()?;
        for u in &states {
            let json = serde_json::to_vec(&u.user)
                .map_err(|e| BrokerError::Internal(format!("user to JSON: {e}")))?;
            meta.put(USERS_SPACE, u.user.name.as_bytes(), &json)?;
        }
        for n in &removed {
            meta.remove(USERS_SPACE, n.as_bytes())?;
        }
        meta.flush()?;
        for u in states {
            map.insert(u.user.name.clone(), u);
        }
        for n in removed {
            map.remove(&n);
        }
        Ok(())
    }
}

/// The stored key of a client key, as [`Change`]s carry it.
pub fn stored_key_hex(client_key: &[u8; KEY_BYTES]) -> String {
    hex(&halfmq_proto::auth::stored_key(client_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_users: 3,
            max_rules_per_user: 2,
        }
    }

    fn key(user: &str) -> String {
        stored_key_hex(&halfmq_proto::auth::client_key(user, "secret of sixteen"))
    }

    fn rule(kind: ResourceKind, pattern: &str, actions: &[&str], deny: bool) -> Rule {
        let a: Vec<String> = actions.iter().map(|s| (*s).to_owned()).collect();
        Rule::new(kind, pattern, &a, deny).unwrap()
    }

    #[test]
    fn changes_apply_survive_a_reopen_and_bad_ones_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(dir.path()).unwrap();
        let users = Users::load(&meta, limits()).unwrap();
        let create = |n: &str| Change::CreateUser {
            name: n.into(),
            stored_key: key(n),
            created_ms: 7,
            rocketmq_key: None,
        };
        users.apply(&create("alice"), &meta).unwrap();
        assert!(matches!(
            users.apply(&create("alice"), &meta),
            Err(BrokerError::UserExists(_))
        ));
        assert!(users.apply(&create("bad name"), &meta).is_err());
        let grant = |r: Rule| Change::Grant {
            user: "alice".into(),
            rule: r,
        };
        users
            .apply(
                &grant(rule(ResourceKind::Topic, "orders-*", &["pub"], false)),
                &meta,
            )
            .unwrap();
        users
            .apply(
                &grant(rule(ResourceKind::Topic, "orders-*", &["sub"], false)),
                &meta,
            )
            .unwrap();
        users
            .apply(
                &grant(rule(ResourceKind::Topic, "orders-x", &["pub"], true)),
                &meta,
            )
            .unwrap();
        // A third target is past max_rules_per_user (2); merging is not.
        let third = grant(rule(ResourceKind::Group, "g", &["sub"], false));
        assert!(matches!(
            users.apply(&third, &meta),
            Err(BrokerError::TooManyRequests(_))
        ));
        assert!(users.allows("alice", Action::Sub, &Resource::Topic("orders-eu")));
        assert!(!users.allows("alice", Action::Pub, &Resource::Topic("orders-x")));
        assert!(!users.allows("bob", Action::Pub, &Resource::Topic("orders-eu")));
        let revoke = Change::Revoke {
            user: "alice".into(),
            rule: rule(ResourceKind::Topic, "orders-*", &["pub"], false),
        };
        users.apply(&revoke, &meta).unwrap();
        assert!(!users.allows("alice", Action::Pub, &Resource::Topic("orders-eu")));
        drop(users);
        let again = Users::load(&meta, limits()).unwrap();
        assert!(again.allows("alice", Action::Sub, &Resource::Topic("orders-eu")));
        assert!(!again.allows("alice", Action::Pub, &Resource::Topic("orders-eu")));
        assert_eq!(again.list(None).len(), 1);
        assert_eq!(
            again.stored_key("alice").map(|k| hex(&k)),
            Some(key("alice"))
        );
        again
            .apply(
                &Change::DeleteUser {
                    name: "alice".into(),
                },
                &meta,
            )
            .unwrap();
        assert!(again.stored_key("alice").is_none());
        assert!(Users::load(&meta, limits()).unwrap().list(None).is_empty());
    }

    #[test]
    fn bootstrap_only_while_no_admin_exists_and_replace_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(dir.path()).unwrap();
        let users = Users::load(&meta, limits()).unwrap();
        assert!(!users.has_admin());
        let boot = |k: String| Change::Bootstrap {
            stored_key: k,
            created_ms: 1,
            rocketmq_key: None,
        };
        users.apply(&boot(key("admin")), &meta).unwrap();
        assert!(users.has_admin());
        assert!(users.allows(ADMIN_USER, Action::Admin, &Resource::Topic("t")));
        // A second bootstrap (another start-up with another secret) changes nothing.
        users.apply(&boot(key("other")), &meta).unwrap();
        assert_eq!(
            users.stored_key(ADMIN_USER).map(|k| hex(&k)),
            Some(key("admin"))
        );
        let snap = users.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: Change = serde_json::from_str(&json).unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let meta2 = Meta::open(dir2.path()).unwrap();
        let other = Users::load(&meta2, limits()).unwrap();
        other
            .apply(
                &Change::CreateUser {
                    name: "gone".into(),
                    stored_key: key("gone"),
                    created_ms: 1,
                    rocketmq_key: None,
                },
                &meta2,
            )
            .unwrap();
        other.apply(&back, &meta2).unwrap();
        assert_eq!(other.list(None), users.list(None));
    }
}
