//! The broker's HTTP endpoint (`http_listen`, default `127.0.0.1:9081`;
//! empty = off), served with axum: `GET /healthz` (the process is up),
//! `GET /readyz` (storage open, accepting, a leader known) and
//! `GET /metrics` (Prometheus text, `metrics.rs`), and the web console on
//! every other path (`console/`).
//!
//! With auth on, `/metrics` takes HTTP Basic credentials of a user with
//! `admin` on `cluster` (user name and halfmq secret), unless
//! `metrics_anonymous = true`; `/healthz` and `/readyz` are always open
//! (they say nothing but up / ready).

mod console;
mod metrics;
mod recorders;

pub use recorders::{Recorders, RequestTimerLayer};

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

use crate::auth::policy::{Action, Resource};
use crate::core::Broker;
use crate::error::BrokerError;

#[derive(Clone)]
struct AppState {
    broker: Arc<Broker>,
    registry: Arc<Registry>,
}

/// Binds `http_listen`; `None` when it is empty (off).
///
/// # Errors
/// [`BrokerError::Config`] naming `http_listen` when it does not parse or
/// cannot be bound.
pub async fn bind(http_listen: &str) -> Result<Option<tokio::net::TcpListener>, BrokerError> {
    if http_listen.is_empty() {
        return Ok(None);
    }
    let bad = |reason: String| {
        BrokerError::Config(crate::config::ConfigError {
            key: "http_listen".into(),
            reason,
        })
    };
    let l = tokio::net::TcpListener::bind(http_listen)
        .await
        .map_err(|e| {
            bad(format!(
                "cannot listen on {http_listen:?}: {e} (empty = off)"
            ))
        })?;
    Ok(Some(l))
}

/// Serves the endpoint on `listener` until the broker begins shutting down:
/// the broker's figures, the histograms of `recorders`, and the replica's
/// view of its group when `node` is a member's consensus.
pub fn spawn(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    recorders: Option<Arc<Recorders>>,
    node: Option<crate::cluster::NodeHandle>,
) -> Option<SocketAddr> {
    let addr = listener.local_addr().ok();
    let state = AppState {
        registry: Arc::new(metrics::registry(
            Arc::clone(&broker),
            recorders.as_deref(),
            node.clone(),
        )),
        broker: Arc::clone(&broker),
    };
    let history = Arc::new(console::History::default());
    console::spawn_sampler(Arc::clone(&broker), Arc::clone(&history));
    let cfg = broker.config();
    let console = console::Console {
        sessions: Arc::new(console::Sessions::new(
            cfg.console_session_ttl_ms,
            cfg.console_max_sessions,
        )),
        broker: Arc::clone(&broker),
        history,
        node,
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(state)
        .merge(console::router(console))
        // Form posts are small; nothing else is posted.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024));
    let mut stop = broker.shutdown_signal();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    });
    if let Some(a) = addr {
        tracing::info!(addr = %a, "HTTP endpoint listening (/metrics, /healthz, /readyz, console at /)");
    }
    addr
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> Response {
    let ready = s
        .broker
        .check_running()
        .and_then(|()| match s.broker.check_serving() {
            // A follower that knows its leader serves (it redirects clients).
            Err(BrokerError::NotLeader(Some(_))) => Ok(()),
            r => r,
        });
    match ready {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

/// Whether `user` with `secret` checks out against the users' stored
/// keys (constant time) and holds `admin` on `cluster`. Runs PBKDF2: call
/// it off the async workers.
pub(crate) fn check_admin(
    users: &crate::auth::users::Users,
    user: &str,
    secret: &str,
) -> Result<(), &'static str> {
    let Some(stored) = users.stored_key(user) else {
        return Err("unknown user or wrong secret");
    };
    let ck = halfmq_proto::auth::client_key(user, secret);
    let got = halfmq_proto::auth::stored_key(&ck);
    use subtle::ConstantTimeEq as _;
    if !bool::from(got.ct_eq(&stored)) {
        return Err("unknown user or wrong secret");
    }
    if !users.allows(user, Action::Admin, &Resource::Cluster) {
        return Err("this user has no admin on cluster");
    }
    Ok(())
}

/// A refused credential check is answered after this long (PBKDF2 already
/// costs one check's time; this slows guessing further).
pub(crate) const AUTH_FAILURE_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether the HTTP Basic credentials (`user:secret`) of `headers` belong
/// to a user with `admin` on `cluster`.
async fn basic_admin(s: &AppState, headers: &HeaderMap) -> bool {
    use base64::Engine as _;
    let Some((user, secret)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|t| t.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())))
    else {
        return false;
    };
    let users = Arc::clone(s.broker.users());
    tokio::task::spawn_blocking(move || check_admin(&users, &user, &secret).is_ok())
        .await
        .unwrap_or(false)
}

async fn metrics_page(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let cfg = s.broker.config();
    if cfg.auth.enabled && !cfg.metrics_anonymous && !basic_admin(&s, &headers).await {
        tracing::warn!(target: "halfmq::audit", path = "/metrics", "HTTP request refused: no admin credentials");
        if headers.contains_key(header::AUTHORIZATION) {
            tokio::time::sleep(AUTH_FAILURE_DELAY).await;
        }
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"halfmq\"")],
            "authentication required: HTTP Basic user:secret of a user with admin on cluster (or metrics_anonymous = true)\n",
        )
            .into_response();
    }
    match metrics::render(&s.registry) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response(),
    }
}
