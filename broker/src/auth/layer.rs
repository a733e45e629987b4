//! The gate in front of every gRPC service: with auth on, a request whose
//! signature does not check out is answered `UNAUTHENTICATED` before any
//! service sees it; one that does carries its [`Principal`] in its
//! extensions, where the services' authorization reads it. Replication
//! RPCs (`halfmq.raft.v1`) are authorized here: AppendEntries, Vote and
//! InstallSnapshot only for the group's members, Status and
//! ChangeMembership for users with `admin` on `cluster`.
//!
//! Repeated failures on one connection are slowed down: from the fourth,
//! each is answered after 100 ms, doubling up to `failure_delay_max_ms`;
//! they are logged (target `halfmq::audit`) with the peer address, the
//! first three and then each power of two.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use halfmq_proto::auth::{HEADER_NONCE, HEADER_PROOF, HEADER_TIME, HEADER_USER};

use super::policy::{Action, Resource};
use super::verify::{Principal, Refusal, Signed, Verifier};

/// What the server knows of a connection, in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Failed authentications on this connection so far.
    pub failures: Arc<AtomicU32>,
}

/// A request on the RocketMQ edge that failed authentication: the edge
/// answers it with the in-body UNAUTHORIZED status RocketMQ clients expect
/// (they read no gRPC status), carrying this message.
#[derive(Debug, Clone)]
pub struct Unauthenticated(pub String);

/// Path prefix of the RocketMQ service.
const ROCKETMQ_PATH: &str = "/apache.rocketmq.v2.";

/// Path prefix of the replication service.
const RAFT_PATH: &str = "/halfmq.raft.v1.Raft/";

/// The clock of the gate, ms since the epoch.
pub type NowMs = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The checks a request passes through (none when auth is off).
pub struct Gate {
    verifier: Verifier,
    now_ms: NowMs,
    failure_delay_max_ms: u64,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate checking with `verifier` at `now_ms`.
    pub fn new(verifier: Verifier, now_ms: NowMs, failure_delay_max_ms: u64) -> Gate {
        Gate {
            verifier,
            now_ms,
            failure_delay_max_ms,
        }
    }

    /// A RocketMQ request's user, from its MQv2-HMAC-SHA1 signature.
    fn check_rocketmq<B>(&self, req: &http::Request<B>) -> Result<Principal, tonic::Status> {
        let h = req.headers();
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
        super::rocketmq::verify(
            self.verifier.users(),
            get(super::rocketmq::AUTHORIZATION),
            get(super::rocketmq::DATE_TIME),
            (self.now_ms)(),
            self.verifier.max_age_ms(),
        )
        .map_err(|r| tonic::Status::unauthenticated(r.to_string()))
    }

    fn check<B>(&self, req: &http::Request<B>) -> Result<Principal, tonic::Status> {
        if req.uri().path().starts_with(ROCKETMQ_PATH) {
            return self.check_rocketmq(req);
        }
        let h = req.headers();
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
        let path = req.uri().path();
        let signed = match (
            get(HEADER_USER),
            get(HEADER_TIME),
            get(HEADER_NONCE),
            get(HEADER_PROOF),
        ) {
            (Some(user), Some(time), Some(nonce), Some(proof)) => Signed {
                user,
                time,
                nonce,
                proof,
            },
            _ => {
                return Err(unauthenticated(&Refusal::Unsigned(
                    "give a user and its secret",
                )))
            }
        };
        let who = self
            .verifier
            .verify(path, signed, (self.now_ms)())
            .map_err(|r| match r {
                Refusal::Busy => tonic::Status::resource_exhausted(r.to_string()),
                r => unauthenticated(&r),
            })?;
        let raft = path.strip_prefix(RAFT_PATH);
        let denied = |action: &'static str, resource: &str| {
            super::audit_denied(who.name(), action, resource, path);
            Err(tonic::Status::permission_denied(format!(
                "permission denied: {action} on {resource}"
            )))
        };
        match (raft, &who) {
            (Some("AppendEntries" | "Vote" | "InstallSnapshot"), Principal::Member) => Ok(who),
            (Some("AppendEntries" | "Vote" | "InstallSnapshot"), Principal::User(_)) => {
                denied("replicate", "cluster (members only)")
            }
            (Some(_), Principal::User(u)) => {
                if self
                    .verifier
                    .users()
                    .allows(u, Action::Admin, &Resource::Cluster)
                {
                    Ok(who)
                } else {
                    denied("admin", "cluster")
                }
            }
            (Some(_), Principal::Member) | (None, Principal::Member) => {
                denied("client calls", "members' credentials")
            }
            (None, Principal::User(_)) => Ok(who),
        }
    }

    /// Counts a failure on the request's connection, logs it, and says how
    /// long to wait before answering.
    fn failed<B>(&self, req: &http::Request<B>, status: &tonic::Status) -> Duration {
        if status.code() != tonic::Code::Unauthenticated {
            return Duration::ZERO;
        }
        let conn = req.extensions().get::<ConnInfo>();
        let n = conn.map_or(1, |c| c.failures.fetch_add(1, Ordering::Relaxed) + 1);
        let peer = conn
            .and_then(|c| c.remote)
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        if n <= 3 || n.is_power_of_two() {
            let user = req
                .headers()
                .get(HEADER_USER)
                .and_then(|v| v.to_str().ok())
                .or_else(|| {
                    req.headers()
                        .get(super::rocketmq::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(super::rocketmq::access_key)
                })
                .unwrap_or("-");
            tracing::warn!(
                target: "halfmq::audit",
                %peer,
                user,
                failures = n,
                path = req.uri().path(),
                reason = status.message(),
                "authentication failed"
            );
        }
        if n <= 3 {
            return Duration::ZERO;
        }
        let ms = 100u64
            .checked_shl(n - 4)
            .unwrap_or(u64::MAX)
            .min(self.failure_delay_max_ms);
        Duration::from_millis(ms)
    }
}

fn unauthenticated(r: &Refusal) -> tonic::Status {
    tonic::Status::unauthenticated(r.to_string())
}

/// The tower layer of the [`Gate`].
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    gate: Option<Arc<Gate>>,
}

impl AuthLayer {
    /// A layer checking every request with `gate`; `None` lets all through.
    pub fn new(gate: Option<Arc<Gate>>) -> AuthLayer {
        AuthLayer { gate }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// A service behind the [`Gate`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    gate: Option<Arc<Gate>>,
}

type Refused<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Refused<S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(gate) = &self.gate else {
            return Either::Left(self.inner.call(req));
        };
        match gate.check(&req) {
            Ok(who) => {
                req.extensions_mut().insert(who);
                Either::Left(self.inner.call(req))
            }
            // RocketMQ clients read only in-body statuses: the edge answers
            // UNAUTHORIZED (after the same slow-down).
            Err(status)
                if status.code() == tonic::Code::Unauthenticated
                    && req.uri().path().starts_with(ROCKETMQ_PATH) =>
            {
                let wait = gate.failed(&req, &status);
                req.extensions_mut()
                    .insert(Unauthenticated(status.message().to_owned()));
                let answer = self.inner.call(req);
                Either::Right(Box::pin(async move {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    answer.await
                }))
            }
            Err(status) => {
                let wait = gate.failed(&req, &status);
                Either::Right(Box::pin(async move {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    Ok(status.into_http())
                }))
            }
        }
    }
}
