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
        tracing::info!(addr = %a, "HTTP endpoint listening (/metrics, /healthz, /readyz)");
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

/// The user of HTTP Basic credentials (`user:secret`), if they check out
/// against the users' stored keys (constant time).
fn basic_user(s: &AppState, headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, secret) = text.split_once(':')?;
    let stored = s.broker.users().stored_key(user)?;
    let ck = halfmq_proto::auth::client_key(user, secret);
    let got = halfmq_proto::auth::stored_key(&ck);
    use subtle::ConstantTimeEq as _;
    bool::from(got.ct_eq(&stored)).then(|| user.to_owned())
}

async fn metrics_page(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let cfg = s.broker.config();
    if cfg.auth.enabled && !cfg.metrics_anonymous {
        let allowed = basic_user(&s, &headers).filter(|u| {
            s.broker
                .users()
                .allows(u, Action::Admin, &Resource::Cluster)
        });
        if allowed.is_none() {
            tracing::warn!(target: "halfmq::audit", path = "/metrics", "HTTP request refused: no admin credentials");
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"halfmq\"")],
                "authentication required: HTTP Basic user:secret of a user with admin on cluster (or metrics_anonymous = true)\n",
            )
                .into_response();
        }
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
