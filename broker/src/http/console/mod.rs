//! The web console on the HTTP endpoint (`/`): server-rendered pages
//! (maud, which escapes everything it interpolates) for operators:
//! overview, topics, consumer groups, transactions, dead letters, users.
//!
//! Sessions: with auth on, `/login` takes a user name and halfmq secret
//! of a user with `admin` on `cluster` (checked again at every request);
//! with auth off every visitor gets a session at once. A session is a
//! random 256-bit token in the cookie `halfmq_session` (`HttpOnly`,
//! `SameSite=Strict`, `Path=/`), kept in memory for
//! `console_session_ttl_ms`, at most `console_max_sessions` of them.
//! Every form carries the session's CSRF token, and every action first
//! shows a confirmation page (`confirm=yes` is posted only from there).
//! Pages are sent with a `Content-Security-Policy` that allows no script.

mod actions;
mod history;
mod pages;
mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::auth::policy::{Action, Resource};
use crate::core::Broker;

pub(super) use history::{spawn_sampler, History};

/// The session cookie's name.
const COOKIE: &str = "halfmq_session";

/// One console session.
#[derive(Debug, Clone)]
struct Session {
    /// The user logged in; `None` with auth off.
    user: Option<String>,
    /// The token every form of this session carries.
    csrf: String,
    created: Instant,
}

/// The console's sessions, by token.
#[derive(Debug)]
pub(super) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    ttl: Duration,
    max: usize,
}

fn token() -> String {
    let b: [u8; 32] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Sessions {
    pub(super) fn new(ttl_ms: u64, max: u32) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            ttl: Duration::from_millis(ttl_ms),
            max: max.max(1) as usize,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for `user`; returns its token.
    fn create(&self, user: Option<String>) -> (String, Session) {
        let mut m = self.lock();
        let ttl = self.ttl;
        m.retain(|_, s| s.created.elapsed() < ttl);
        while m.len() >= self.max {
            let oldest = m
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => m.remove(&k),
                None => break,
            };
        }
        let s = Session {
            user,
            csrf: token(),
            created: Instant::now(),
        };
        let t = token();
        m.insert(t.clone(), s.clone());
        (t, s)
    }

    fn get(&self, token: &str) -> Option<Session> {
        let mut m = self.lock();
        match m.get(token) {
            Some(s) if s.created.elapsed() < self.ttl => Some(s.clone()),
            Some(_) => {
                m.remove(token);
                None
            }
            None => None,
        }
    }

    fn remove(&self, token: &str) {
        self.lock().remove(token);
    }
}

/// What the console's handlers share.
#[derive(Clone)]
pub(super) struct Console {
    pub(super) broker: Arc<Broker>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) history: Arc<History>,
    pub(super) node: Option<crate::cluster::NodeHandle>,
}

/// The caller of a page or action: who, and the token their forms carry.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    /// The user; "-" with auth off.
    pub(super) user: String,
    pub(super) csrf: String,
    /// Whether auth is on (the page offers logout then).
    pub(super) auth: bool,
    /// A `Set-Cookie` for a session made by this request.
    set_cookie: Option<String>,
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

fn set_cookie(token: &str, max_age_s: u64) -> String {
    format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}")
}

impl Console {
    fn auth_on(&self) -> bool {
        self.broker.config().auth.enabled
    }

    /// The caller of a request, or where to send them (the login page).
    pub(super) fn caller(&self, headers: &HeaderMap) -> Result<Caller, Box<Response>> {
        let auth = self.auth_on();
        let session = cookie_token(headers).and_then(|t| self.sessions.get(&t));
        match (auth, session) {
            (true, Some(s)) => {
                let user = s.user.clone().unwrap_or_default();
                // The policy may have changed since the login.
                if !self
                    .broker
                    .users()
                    .allows(&user, Action::Admin, &Resource::Cluster)
                {
                    return Err(Box::new(Redirect::to("/login").into_response()));
                }
                Ok(Caller {
                    user,
                    csrf: s.csrf,
                    auth,
                    set_cookie: None,
                })
            }
            (true, None) => Err(Box::new(Redirect::to("/login").into_response())),
            (false, Some(s)) => Ok(Caller {
                user: "-".into(),
                csrf: s.csrf,
                auth,
                set_cookie: None,
            }),
            (false, None) => {
                let (t, s) = self.sessions.create(None);
                Ok(Caller {
                    user: "-".into(),
                    csrf: s.csrf,
                    auth,
                    set_cookie: Some(set_cookie(&t, self.sessions.ttl.as_secs())),
                })
            }
        }
    }

    /// The caller of a form post whose CSRF token is `csrf`.
    pub(super) fn poster(&self, headers: &HeaderMap, csrf: &str) -> Result<Caller, Box<Response>> {
        let c = self.caller(headers)?;
        if c.set_cookie.is_some() || !ct_eq(c.csrf.as_bytes(), csrf.as_bytes()) {
            tracing::warn!(target: "halfmq::audit", user = %c.user, "console form refused: bad CSRF token");
            return Err(Box::new(page_response(
                None,
                StatusCode::FORBIDDEN,
                view::bare(
                    "Refused",
                    "This form's token does not match your session: reload the page and try again.",
                ),
            )));
        }
        Ok(c)
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A page with the console's security headers (and the caller's new
/// session cookie).
pub(super) fn page_response(
    caller: Option<&Caller>,
    status: StatusCode,
    body: maud::Markup,
) -> Response {
    let mut r = (status, axum::response::Html(body.into_string())).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = caller.and_then(|c| c.set_cookie.as_ref()) {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    r
}

/// The console's routes.
pub(super) fn router(c: Console) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/topics", get(pages::topics))
        .route("/groups", get(pages::groups))
        .route("/transactions", get(pages::transactions))
        .route("/dlq", get(pages::dlq_groups))
        .route("/dlq/{group}", get(pages::dlq_group))
        .route("/users", get(pages::users))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/actions/end-transaction", post(actions::end_transaction))
        .route("/actions/redrive", post(actions::redrive))
        .route("/actions/purge", post(actions::purge))
        .with_state(c)
}

async fn login_page(State(c): State<Console>) -> Response {
    if !c.auth_on() {
        return Redirect::to("/").into_response();
    }
    page_response(None, StatusCode::OK, view::login(None))
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    secret: String,
}

async fn login(State(c): State<Console>, Form(f): Form<LoginForm>) -> Response {
    if !c.auth_on() {
        return Redirect::to("/").into_response();
    }
    let users = Arc::clone(c.broker.users());
    let (user, secret) = (f.user.clone(), f.secret);
    // PBKDF2 off the async workers.
    let checked = tokio::task::spawn_blocking(move || {
        super::check_admin(&users, &user, &secret).map_err(|e| {
            if e.starts_with("this user") {
                "this user has no admin on cluster, which the console needs"
            } else {
                e
            }
        })
    })
    .await
    .unwrap_or(Err("the check failed"));
    match checked {
        Ok(()) => {
            crate::auth::audit_admin(&f.user, "console login", "cluster", "OK");
            let (t, _) = c.sessions.create(Some(f.user));
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&set_cookie(&t, c.sessions.ttl.as_secs())) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(why) => {
            tracing::warn!(target: "halfmq::audit", user = %f.user, reason = why, "console login refused");
            tokio::time::sleep(super::AUTH_FAILURE_DELAY).await;
            page_response(None, StatusCode::UNAUTHORIZED, view::login(Some(why)))
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(c): State<Console>, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if let Err(r) = c.poster(&headers, &f.csrf) {
        return *r;
    }
    if let Some(t) = cookie_token(&headers) {
        c.sessions.remove(&t);
    }
    let mut r = Redirect::to(if c.auth_on() { "/login" } else { "/" }).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("halfmq_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bounded_and_expire() {
        let s = Sessions::new(60_000, 2);
        let (a, _) = s.create(Some("a".into()));
        std::thread::sleep(Duration::from_millis(2));
        let (b, _) = s.create(Some("b".into()));
        std::thread::sleep(Duration::from_millis(2));
        let (c, _) = s.create(Some("c".into()));
        assert!(s.get(&a).is_none(), "the oldest is dropped");
        assert_eq!(s.get(&b).and_then(|x| x.user).as_deref(), Some("b"));
        assert!(s.get(&c).is_some());
        let short = Sessions::new(1, 10);
        let (t, _) = short.create(None);
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get(&t).is_none(), "expired");
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; halfmq_session=abc; b=2"),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("abc"));
        assert!(set_cookie("x", 5).contains("HttpOnly; SameSite=Strict"));
    }
}
