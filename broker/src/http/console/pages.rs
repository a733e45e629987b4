//! The console's pages (GET): each reads the broker's state at request
//! time and renders it; listings are bounded (`LIST_LIMIT` rows).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{html, Markup, PreEscaped};

use super::history::sparkline;
use super::view::{action_form, age, bytes, layout};
use super::{page_response, Caller, Console};
use crate::core::redelivery::DeadLetter;

/// Most rows a listing shows.
pub(super) const LIST_LIMIT: usize = 1000;
/// Most body bytes shown per dead letter.
const BODY_PREVIEW_BYTES: usize = 256;

fn render(c: &Caller, active: &str, title: &str, body: Markup) -> Response {
    page_response(Some(c), StatusCode::OK, layout(c, active, title, body))
}

fn card(k: &str, v: impl std::fmt::Display) -> Markup {
    html! { div.card { div.v { (v.to_string()) } div.k { (k) } } }
}

pub(super) async fn overview(State(c): State<Console>, headers: HeaderMap) -> Response {
    let caller = match c.caller(&headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let s = c.broker.stats();
    let disk = super::super::metrics::disk_free_bytes(&c.broker.config().data_dir);
    let dlq: u64 = c.broker.dead_letter_counts().iter().map(|(_, n)| n).sum();
    let retries: u64 = s.groups.iter().map(|g| g.retries_scheduled).sum();
    let lag: u64 = s.groups.iter().map(|g| g.lag).sum();
    let node = c.node.as_ref().map(|n| n.status());
    let body = html! {
        @if let Some(n) = &node {
            h2 { "Broker group" }
            div.cards {
                (card("node id", n.node_id))
                (card("role", &n.role))
                (card("term", n.term))
                (card("leader", if n.leader_address.is_empty() { "unknown".to_owned() } else { format!("{} ({})", n.leader_id.unwrap_or(0), n.leader_address) }))
                (card("last log index", n.last_log_index))
                (card("last applied", n.last_applied))
            }
        }
        h2 { "Rates (sampled every 5 s, last 6 minutes)" }
        div.charts {
            @for series in c.history.series() {
                div.chart {
                    @let peak = series.rates.iter().copied().fold(0.0_f64, f64::max);
                    div.k { (series.name) ": now " b { (format!("{:.0}", series.rates.last().copied().unwrap_or(0.0))) } ", peak " (format!("{peak:.0}")) }
                    @if series.rates.len() < 2 {
                        div.muted { "collecting…" }
                    } @else {
                        (PreEscaped(sparkline(&series.rates, 260, 50)))
                    }
                }
            }
        }
        h2 { "Now" }
        div.cards {
            (card("uptime", age(s.uptime_ms)))
            (card("connections", s.connections))
            (card("producer sessions", s.producer_sessions))
            (card("commit log", bytes(s.commit_log_bytes)))
            (card("disk free", bytes(disk)))
            (card("messages in", s.messages_in))
            (card("messages out", s.messages_out))
            (card("consumer lag", lag))
            (card("pending halves", s.pending_halves))
            (card("given-up halves", s.given_up_halves))
            (card("delayed messages", s.delayed_messages))
            (card("retries scheduled", retries))
            (card("dead letters", dlq))
            (card("fdatasyncs", s.commit_log_fsyncs))
        }
    };
    render(&caller, "/", "Overview", body)
}

pub(super) async fn topics(State(c): State<Console>, headers: HeaderMap) -> Response {
    let caller = match c.caller(&headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let store = Arc::clone(c.broker.store());
    let topics = c.broker.list_topics();
    let body = html! {
        p.muted { (topics.len()) " topics. Offsets are queue offsets: min is the oldest kept, max the next to be written." }
        table id="topics" {
            tr { th { "topic" } th { "queues" } th { "messages" } th { "queue: min – max offset" } }
            @for t in topics.iter().take(LIST_LIMIT) {
                tr {
                    td.topic { (t.name) }
                    td.n { (t.queues) }
                    td.n { (t.messages) }
                    td {
                        @for q in 0..t.queues {
                            @let (min, max) = store.queue(&t.name, q).map_or((0, 0), |cq| (cq.min_offset(), cq.next_offset()));
                            span { (q) ": " (min) " – " (max) } @if q + 1 < t.queues { ", " }
                        }
                    }
                }
            }
        }
    };
    render(&caller, "/topics", "Topics", body)
}

pub(super) async fn groups(State(c): State<Console>, headers: HeaderMap) -> Response {
    let caller = match c.caller(&headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let declared: BTreeMap<String, bool> = c
        .broker
        .list_consumer_groups()
        .into_iter()
        .map(|g| (g.group, g.fifo))
        .collect();
    let dlq: BTreeMap<String, u64> = c.broker.dead_letter_counts().into_iter().collect();
    let s = c.broker.stats();
    let body = html! {
        table id="groups" {
            tr { th { "group" } th { "topic" } th { "FIFO" } th { "lag" } th { "in flight" } th { "acked" } th { "retries scheduled" } th { "dead letters" } th { "lag per queue" } }
            @for g in s.groups.iter().filter(|g| !g.topic.starts_with('%')).take(LIST_LIMIT) {
                tr data-group=(g.group) data-topic=(g.topic) {
                    td { (g.group) }
                    td { (g.topic) }
                    td { @if declared.get(&g.group) == Some(&true) { "yes" } @else { "no" } }
                    td.n.lag { (g.lag) }
                    td.n { (g.inflight) }
                    td.n { (g.acked) }
                    td.n { (g.retries_scheduled) }
                    td.n { a href=(format!("/dlq/{}", g.group)) { (dlq.get(&g.group).copied().unwrap_or(0)) } }
                    td {
                        @for q in &g.queues {
                            span title=(format!("max offset {}, acked {}, in flight {}", q.max_offset, q.acked, q.inflight)) { (q.queue_id) ": " (q.lag) } " "
                        }
                    }
                }
            }
        }
        @let idle: Vec<_> = declared.iter().filter(|(g, _)| !s.groups.iter().any(|x| &x.group == *g)).collect();
        @if !idle.is_empty() {
            h2 { "Declared, nothing consumed yet" }
            ul { @for (g, fifo) in idle { li { (g) @if *fifo { " (FIFO)" } } } }
        }
    };
    render(&caller, "/groups", "Consumer groups", body)
}

pub(super) async fn transactions(State(c): State<Console>, headers: HeaderMap) -> Response {
    let caller = match c.caller(&headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let b = Arc::clone(&c.broker);
    let listed = match tokio::task::spawn_blocking(move || b.list_transactions(LIST_LIMIT)).await {
        Ok(v) => v,
        Err(e) => {
            let body = html! { p.error { "listing transactions failed: " (e.to_string()) } };
            return render(&caller, "/transactions", "Transactions", body);
        }
    };
    let given_up = listed.iter().filter(|t| t.given_up).count();
    let body = html! {
        p.muted { (listed.len()) " pending halves listed (at most " (LIST_LIMIT) "), " (given_up) " given up. A given-up half waits for an operator: commit delivers it once, roll back discards it." }
        table id="transactions" {
            tr { th { "transaction id" } th { "topic" } th { "producer group" } th { "age" } th { "checks" } th { "state" } th { "" } }
            @for t in &listed {
                tr data-tx=(t.transaction_id) {
                    td { code { (t.transaction_id) } }
                    td { (t.topic) }
                    td { (t.producer_group) }
                    td.n { (age(t.age_ms)) }
                    td.n { (t.check_times) }
                    td { @if t.given_up { b { "given up" } } @else { "pending" } @if !t.note.is_empty() { br; span.muted { (t.note) } } }
                    td {
                        @if t.given_up {
                            (action_form(&caller, "/actions/end-transaction", &[("transaction_id", &t.transaction_id), ("resolution", "commit")], "Commit", false))
                            " "
                            (action_form(&caller, "/actions/end-transaction", &[("transaction_id", &t.transaction_id), ("resolution", "rollback")], "Roll back", true))
                        }
                    }
                }
            }
        }
    };
    render(&caller, "/transactions", "Transactions", body)
}

pub(super) async fn dlq_groups(State(c): State<Console>, headers: HeaderMap) -> Response {
    let caller = match c.caller(&headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let counts = c.broker.dead_letter_counts();
    let body = html! {
        @if counts.is_empty() { p.muted { "No consumer group has dead letters." } }
        @else {
            table id="dlq-groups" {
                tr { th { "consumer group" } th { "dead letters" } }
                @for (g, n) in counts.iter().take(LIST_LIMIT) {
                    tr { td { a href=(format!("/dlq/{g}")) { (g) } } td.n { (n) } }
                }
            }
        }
    };
    render(&caller, "/dlq", "Dead letters", body)
}

fn body_preview(d: &DeadLetter) -> String {
    match &d.content {
        Some(c) => {
            let n = c.body.len().min(BODY_PREVIEW_BYTES);
            let mut s = String::from_utf8_lossy(&c.body[..n]).into_owned();
            if c.body.len() > n {
                s.push_str(&format!("… ({} bytes)", c.body.len()));
            }
            s
        }
        None if d.body_omitted => "(omitted: listing budget)".into(),
        None => String::new(),
    }
}

pub(super) async fn dlq_group(
    State(c): State<Console>,
    Path(group): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match c.caller(&headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let b = Arc::clone(&c.broker);
    let g = group.clone();
    let listed = tokio::task::spawn_blocking(move || b.dead_letters(&g, LIST_LIMIT, true, None))
        .await
        .unwrap_or_else(|e| Err(crate::error::BrokerError::Internal(e.to_string())));
    let title = format!("Dead letters of {group}");
    let body = match listed {
        Err(e) => html! { p.error { (e.to_string()) } },
        Ok(v) => html! {
            div {
                "Dead letters: " b id="dlq-count" { (v.len()) } ". "
                @if !v.is_empty() {
                    (action_form(&caller, "/actions/redrive", &[("group", &group), ("message_id", "")], "Redrive all", false))
                    " "
                    (action_form(&caller, "/actions/purge", &[("group", &group)], "Purge all", true))
                }
            }
            table id="dead-letters" {
                tr { th { "message id" } th { "topic" } th { "tag / keys" } th { "reconsumed" } th { "reason" } th { "body" } th { "" } }
                @for d in &v {
                    @let id = d.message_id.to_string();
                    tr data-message-id=(id) {
                        td { code { (id) } }
                        td { (d.topic) }
                        td { @if let Some(ct) = &d.content { (ct.tag) @if !ct.keys.is_empty() { br; span.muted { (ct.keys.join(" ")) } } } }
                        td.n { (d.reconsume_times) }
                        td { (d.reason) }
                        td { pre.body { (body_preview(d)) } }
                        td { (action_form(&caller, "/actions/redrive", &[("group", &group), ("message_id", &id)], "Redrive", false)) }
                    }
                }
            }
        },
    };
    render(&caller, "/dlq", &title, body)
}

pub(super) async fn users(State(c): State<Console>, headers: HeaderMap) -> Response {
    let caller = match c.caller(&headers) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let body = if c.broker.config().auth.enabled {
        let users = c.broker.users().list(None);
        html! {
            p.muted { "Change users and policies with " code { "halfmq user" } " and " code { "halfmq acl" } " (README \"Security\")." }
            table id="users" {
                tr { th { "user" } th { "created" } th { "RocketMQ key" } th { "rules" } }
                @for u in users.iter().take(LIST_LIMIT) {
                    tr {
                        td { (u.name) }
                        td.n { (u.created_ms) }
                        td { @if u.rocketmq_key.is_some() { "yes" } @else { "no" } }
                        td {
                            @for r in &u.rules {
                                div {
                                    @if r.deny { b { "deny " } } @else { "allow " }
                                    (r.actions().join(",")) " on " (r.kind.name())
                                    @if !r.pattern.is_empty() { " " code { (r.pattern) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    } else {
        html! { p { "Auth is off ([auth] enabled = false): there are no users or policies." } }
    };
    render(&caller, "/users", "Users and policies", body)
}
