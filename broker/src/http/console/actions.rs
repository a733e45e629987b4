//! The console's actions (POST): end a transaction, redrive or purge dead
//! letters. Each needs the session's CSRF token; without `confirm=yes` it
//! only shows what it would do and asks. Each done action is logged like
//! the Admin API's (target `halfmq::audit`).

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::view::{confirm, outcome};
use super::{page_response, Caller, Console};
use crate::core::transactions::{EndSource, Resolution};
use crate::error::BrokerError;

#[derive(Deserialize)]
pub(super) struct EndForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    transaction_id: String,
    #[serde(default)]
    resolution: String,
}

#[derive(Deserialize)]
pub(super) struct DlqForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    message_id: String,
}

fn done(c: &Caller, active: &str, r: Result<String, BrokerError>, back: &str) -> Response {
    let status = match &r {
        Ok(_) => StatusCode::OK,
        Err(BrokerError::BadRequest(_) | BrokerError::TransactionNotFound(_)) => {
            StatusCode::BAD_REQUEST
        }
        Err(_) => StatusCode::CONFLICT,
    };
    page_response(
        Some(c),
        status,
        outcome(c, active, r.map_err(|e| e.to_string()), back),
    )
}

/// The confirmation page of an action not yet confirmed.
fn ask(
    c: &Caller,
    active: &str,
    question: &str,
    action: &str,
    fields: &[(&str, &str)],
    back: &str,
) -> Response {
    page_response(
        Some(c),
        StatusCode::OK,
        confirm(c, active, question, action, fields, back),
    )
}

fn audit(c: &Caller, action: &str, res: &str, r: &Result<String, BrokerError>) {
    let outcome = match r {
        Ok(_) => "OK".to_owned(),
        Err(e) => e.to_string(),
    };
    crate::auth::audit_admin(&c.user, action, res, &outcome);
}

pub(super) async fn end_transaction(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(f): Form<EndForm>,
) -> Response {
    let caller = match c.poster(&headers, &f.csrf) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let back = "/transactions";
    let resolution = match f.resolution.as_str() {
        "commit" => Resolution::Commit,
        "rollback" => Resolution::Rollback,
        other => {
            let e = BrokerError::BadRequest(format!("resolution {other:?}: commit or rollback"));
            return done(&caller, back, Err(e), back);
        }
    };
    let verb = if resolution == Resolution::Commit {
        "Commit"
    } else {
        "Roll back"
    };
    if f.confirm != "yes" {
        let q = format!(
            "{verb} transaction {}? {}",
            f.transaction_id,
            if resolution == Resolution::Commit {
                "Its half message becomes visible to consumers, once."
            } else {
                "Its half message is discarded; consumers never see it."
            }
        );
        let fields = [
            ("transaction_id", f.transaction_id.as_str()),
            ("resolution", f.resolution.as_str()),
        ];
        return ask(&caller, back, &q, "/actions/end-transaction", &fields, back);
    }
    let r = c
        .broker
        .end_transaction(&f.transaction_id, resolution, EndSource::Operator)
        .await
        .map(|()| format!("{verb}: transaction {} ended.", f.transaction_id));
    audit(
        &caller,
        "console end transaction",
        &format!("transaction:{}", f.transaction_id),
        &r,
    );
    done(&caller, back, r, back)
}

pub(super) async fn redrive(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(f): Form<DlqForm>,
) -> Response {
    let caller = match c.poster(&headers, &f.csrf) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let back = format!("/dlq/{}", f.group);
    let id = match crate::core::names::parse_message_id(&f.message_id) {
        Ok(id) => id,
        Err(e) => return done(&caller, "/dlq", Err(e), &back),
    };
    if f.confirm != "yes" {
        let q = match id {
            Some(id) => format!(
                "Redrive dead letter {id} of group {}? It is delivered to the group again, with its reconsume times reset.",
                f.group
            ),
            None => format!(
                "Redrive every dead letter of group {}? They are delivered to the group again, with their reconsume times reset.",
                f.group
            ),
        };
        let fields = [
            ("group", f.group.as_str()),
            ("message_id", f.message_id.as_str()),
        ];
        return ask(&caller, "/dlq", &q, "/actions/redrive", &fields, &back);
    }
    let r = c
        .broker
        .redrive(&f.group, id)
        .await
        .map(|n| format!("Redrove {n} dead letter(s) of group {}.", f.group));
    audit(
        &caller,
        "console dlq redrive",
        &format!("group:{}", f.group),
        &r,
    );
    done(&caller, "/dlq", r, &back)
}

pub(super) async fn purge(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(f): Form<DlqForm>,
) -> Response {
    let caller = match c.poster(&headers, &f.csrf) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let back = format!("/dlq/{}", f.group);
    if f.confirm != "yes" {
        let q = format!(
            "Purge every dead letter of group {}? They are gone for good.",
            f.group
        );
        let fields = [("group", f.group.as_str())];
        return ask(&caller, "/dlq", &q, "/actions/purge", &fields, &back);
    }
    let r = c
        .broker
        .purge_dead_letters_everywhere(&f.group)
        .await
        .map(|n| format!("Purged {n} dead letter(s) of group {}.", f.group));
    audit(
        &caller,
        "console dlq purge",
        &format!("group:{}", f.group),
        &r,
    );
    done(&caller, "/dlq", r, &back)
}
