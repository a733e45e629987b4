//! Security: who may do what (README "Security").
//!
//! - [`config`]: the `[auth]` and `[tls]` configuration sections.
//! - [`policy`]: rules and the allow/deny decision (pure).
//! - [`users`]: users and their policies, the deterministic state that a
//!   broker group replicates (`%AUTH%` records, `core/security.rs`).
//! - [`verify`]: checking a signed request, the replay cache.
//! - [`layer`]: the gate in front of the gRPC services (authentication,
//!   replication RPCs' authorization, slowing down failures).
//! - [`tls`]: rustls of the listener and of members' connections.
//!
//! The API edges authorize each request with [`authorize`] against the
//! [`verify::Principal`] the gate put in its extensions. Every denial and
//! every admin action is logged with target `halfmq::audit`.

pub mod config;
pub mod layer;
pub mod policy;
pub mod rocketmq;
pub mod tls;
pub mod users;
pub mod verify;

use policy::{Action, Resource};
use users::Users;
use verify::Principal;

use crate::error::BrokerError;

/// Logs a denial (target `halfmq::audit`).
pub fn audit_denied(user: &str, action: &str, resource: &str, rpc: &str) {
    tracing::warn!(target: "halfmq::audit", user, action, resource, rpc, "denied");
}

/// Logs an admin action and its outcome (target `halfmq::audit`).
pub fn audit_admin(user: &str, action: &str, resource: &str, outcome: &str) {
    tracing::info!(target: "halfmq::audit", user, action, resource, outcome, "admin action");
}

/// Whether `who` may do one of `actions` on `res` (always with auth off);
/// nothing is logged. Listings show only what this allows.
pub fn permits_any(
    users: Option<&Users>,
    who: Option<&Principal>,
    actions: &[Action],
    res: &Resource<'_>,
) -> bool {
    let Some(users) = users else {
        return true;
    };
    match who {
        Some(Principal::User(u)) => actions.iter().any(|a| users.allows(u, *a, res)),
        _ => false,
    }
}

/// [`authorize`] for one of `actions`: a denial names and logs the first.
///
/// # Errors
/// As [`authorize`].
pub fn authorize_any(
    users: Option<&Users>,
    who: Option<&Principal>,
    actions: &[Action],
    res: &Resource<'_>,
    rpc: &str,
) -> Result<(), BrokerError> {
    if permits_any(users, who, actions, res) {
        return Ok(());
    }
    let first = actions.first().copied().unwrap_or(Action::Admin);
    authorize(users, who, first, res, rpc)
}

/// Whether `who` may do `action` on `res`; always with auth off (`users`
/// `None`). Denials are logged.
///
/// # Errors
/// [`BrokerError::PermissionDenied`] naming the action and resource.
pub fn authorize(
    users: Option<&Users>,
    who: Option<&Principal>,
    action: Action,
    res: &Resource<'_>,
    rpc: &str,
) -> Result<(), BrokerError> {
    let Some(users) = users else {
        return Ok(());
    };
    let allowed = match who {
        Some(Principal::User(u)) => users.allows(u, action, res),
        Some(Principal::Member) | None => false,
    };
    if allowed {
        return Ok(());
    }
    let name = who.map_or("-", Principal::name);
    audit_denied(name, action.name(), &res.to_string(), rpc);
    Err(BrokerError::PermissionDenied {
        action: action.name(),
        resource: res.to_string(),
    })
}
