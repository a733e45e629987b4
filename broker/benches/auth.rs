//! Criterion benches of what auth adds to each request: the client's
//! signature (`Signer::sign`), the broker's check of it (`Verifier::verify`,
//! replay cache included) and a policy decision (`Users::allows`).
//!
//! ```text
//! cargo bench -p halfmq-broker --bench auth
//! ```
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use halfmq_broker::auth::policy::{Action, Resource, ResourceKind, Rule};
use halfmq_broker::auth::users::{stored_key_hex, Change, Limits, Users};
use halfmq_broker::auth::verify::{Signed, Verifier};
use halfmq_proto::auth::{self, Signer};

const PATH: &str = "/halfmq.v1.Producer/Send";

fn auth_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let meta = halfmq_storage::Meta::open(dir.path()).unwrap();
    let limits = Limits {
        max_users: 10,
        max_rules_per_user: 16,
    };
    let users = Arc::new(Users::load(&meta, limits).unwrap());
    let secret = "a secret of the bench";
    let key = stored_key_hex(&auth::client_key("app", secret));
    let create = Change::CreateUser {
        name: "app".into(),
        stored_key: key,
        created_ms: 0,
        rocketmq_key: None,
    };
    users.apply(&create, &meta).unwrap();
    for (kind, pattern, action) in [
        (ResourceKind::Topic, "audit-*", "sub"),
        (ResourceKind::Group, "billing", "sub"),
        (ResourceKind::Topic, "orders-*", "pub"),
    ] {
        let rule = Rule::new(kind, pattern, &[action.to_owned()], false).unwrap();
        users
            .apply(
                &Change::Grant {
                    user: "app".into(),
                    rule,
                },
                &meta,
            )
            .unwrap();
    }
    let signer = Signer::new("app", secret);
    let mut g = c.benchmark_group("auth");
    g.bench_function("client_sign", |b| {
        let mut md = tonic::metadata::MetadataMap::new();
        b.iter(|| signer.sign(PATH, &mut md))
    });
    // A fresh signature per iteration (the replay cache refuses repeats),
    // made outside the timed part; the cache is large enough not to fill.
    let v = Verifier::new(Arc::clone(&users), None, 300_000, 100_000_000);
    g.bench_function("broker_verify", |b| {
        b.iter_batched(
            || {
                let mut md = tonic::metadata::MetadataMap::new();
                signer.sign(PATH, &mut md);
                let get = |k: &str| md.get(k).unwrap().to_str().unwrap().to_owned();
                let now = get(auth::HEADER_TIME).parse::<u64>().unwrap();
                (
                    get(auth::HEADER_TIME),
                    get(auth::HEADER_NONCE),
                    get(auth::HEADER_PROOF),
                    now,
                )
            },
            |(time, nonce, proof, now)| {
                let s = Signed {
                    user: "app",
                    time: &time,
                    nonce: &nonce,
                    proof: &proof,
                };
                v.verify(PATH, s, now).unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("policy_allows", |b| {
        b.iter(|| users.allows("app", Action::Pub, &Resource::Topic("orders-eu")))
    });
    g.finish();
}

criterion_group!(benches, auth_benches);
criterion_main!(benches);
