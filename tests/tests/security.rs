//! Security end to end (issue #19): signed requests for every RPC family
//! (none, wrong, unknown, stale, replayed), policies (nothing stored or
//! changed without the permission; prefix and deny rules; producer
//! sessions), persistence across a restart, slowing down failures, TLS and
//! mTLS with generated certificates.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq_broker::auth::config::SecretString;
use halfmq_broker::{BrokerConfig, RunningBroker};
use halfmq_client::{
    Admin, Client, ClientError, ClientOptions, Consumer, Credentials, Message, MessageView,
    Producer, Rule, Security, TlsOptions, TransactionProducer, TransactionResolution,
};
use halfmq_proto::{auth, raft as rpb, v1 as pb};
use halfmq_tests::certs::certs;
use halfmq_tests::{start, test_config};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

const ADMIN_SECRET: &str = "the admin secret of the tests";

fn auth_config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig {
        transaction_timeout_ms: 200,
        check_interval_ms: 200,
        check_reply_timeout_ms: 500,
        check_max: 50,
        ..test_config(dir)
    };
    c.auth.enabled = true;
    c.auth.admin_secret = Some(SecretString::new(ADMIN_SECRET));
    c.auth.failure_delay_max_ms = 400;
    c
}

async fn as_user(addr: &str, user: &str, secret: &str) -> Client {
    let opts = ClientOptions {
        credentials: Some(Credentials::new(user, secret)),
        max_attempts: 1,
        ..ClientOptions::default()
    };
    Client::connect_with(addr, opts).await.unwrap()
}

/// The gRPC code of a failed call (`Ok` for success).
fn grpc<T>(r: &Result<T, ClientError>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(ClientError::Transport(s)) => s.code(),
        Err(e) => panic!("expected a gRPC status, got {e}"),
    }
}

/// A broker with auth on; the admin's client; a user per (name, rules),
/// and their secrets.
async fn setup(
    dir: &std::path::Path,
    users: &[(&str, Vec<Rule>)],
) -> (RunningBroker, Client, Vec<Client>, Vec<String>) {
    let b = start(auth_config(dir)).await;
    let addr = b.addr.to_string();
    let admin = as_user(&addr, "admin", ADMIN_SECRET).await;
    let sec = Security::new(admin.clone());
    let mut clients = Vec::new();
    let mut secrets = Vec::new();
    for (name, rules) in users {
        let secret = sec.create_user(name).await.unwrap();
        assert_eq!(secret.len(), 64);
        for r in rules {
            sec.grant(name, r).await.unwrap();
        }
        clients.push(as_user(&addr, name, &secret).await);
        secrets.push(secret);
    }
    (b, admin, clients, secrets)
}

/// Signature headers for `path`, as `user` with `secret`, at `time_ms`.
fn signed(path: &str, user: &str, secret: &str, time_ms: u64) -> MetadataMap {
    let nonce = auth::hex(&rand::random::<[u8; 16]>());
    let c = auth::canonical(path, user, time_ms, &nonce);
    let proof = auth::hex(&auth::proof(&auth::client_key(user, secret), &c));
    let mut md = MetadataMap::new();
    md.insert(auth::HEADER_USER, user.parse().unwrap());
    md.insert(auth::HEADER_TIME, time_ms.to_string().parse().unwrap());
    md.insert(auth::HEADER_NONCE, nonce.parse().unwrap());
    md.insert(auth::HEADER_PROOF, proof.parse().unwrap());
    md
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One RPC of each family, sent with exactly the metadata `md`.
#[derive(Debug, Clone, Copy)]
enum Family {
    Send,
    Session,
    Receive,
    ListTopics,
    ListUsers,
    RaftStatus,
}

impl Family {
    const ALL: [Family; 6] = [
        Family::Send,
        Family::Session,
        Family::Receive,
        Family::ListTopics,
        Family::ListUsers,
        Family::RaftStatus,
    ];

    fn path(self) -> &'static str {
        match self {
            Family::Send => "/halfmq.v1.Producer/Send",
            Family::Session => "/halfmq.v1.Producer/Session",
            Family::Receive => "/halfmq.v1.Consumer/Receive",
            Family::ListTopics => "/halfmq.v1.Admin/ListTopics",
            Family::ListUsers => "/halfmq.v1.Security/ListUsers",
            Family::RaftStatus => "/halfmq.raft.v1.Raft/Status",
        }
    }

    async fn call(self, ch: &Channel, md: MetadataMap) -> tonic::Status {
        fn req<T>(m: T, md: MetadataMap) -> tonic::Request<T> {
            let mut r = tonic::Request::new(m);
            *r.metadata_mut() = md;
            r
        }
        fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
            match r {
                Ok(_) => tonic::Status::ok(""),
                Err(s) => s,
            }
        }
        match self {
            Family::Send => {
                let m = pb::Message {
                    topic: "t".into(),
                    body: bytes::Bytes::from_static(b"x"),
                    ..Default::default()
                };
                let r = pb::SendRequest { messages: vec![m] };
                code(
                    pb::producer_client::ProducerClient::new(ch.clone())
                        .send(req(r, md))
                        .await,
                )
            }
            Family::Session => {
                let hello = pb::SessionUp {
                    kind: Some(pb::session_up::Kind::Hello(pb::Hello {
                        producer_group: "pg".into(),
                        topics: vec![],
                    })),
                };
                let up = tokio_stream::iter(vec![hello]);
                code(
                    pb::producer_client::ProducerClient::new(ch.clone())
                        .session(req(up, md))
                        .await,
                )
            }
            Family::Receive => {
                let r = pb::ReceiveRequest {
                    group: "g".into(),
                    topic: "t".into(),
                    max_messages: 1,
                    ..Default::default()
                };
                code(
                    pb::consumer_client::ConsumerClient::new(ch.clone())
                        .receive(req(r, md))
                        .await,
                )
            }
            Family::ListTopics => code(
                pb::admin_client::AdminClient::new(ch.clone())
                    .list_topics(req(pb::ListTopicsRequest {}, md))
                    .await,
            ),
            Family::ListUsers => code(
                pb::security_client::SecurityClient::new(ch.clone())
                    .list_users(req(pb::ListUsersRequest::default(), md))
                    .await,
            ),
            Family::RaftStatus => code(
                rpb::raft_client::RaftClient::new(ch.clone())
                    .status(req(rpb::NodeStatusRequest {}, md))
                    .await,
            ),
        }
    }
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn every_rpc_family_refuses_unsigned_wrong_unknown_stale_and_replayed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _admin, _, _) = setup(dir.path(), &[]).await;
    for f in Family::ALL {
        // A fresh connection per family: failures on one are slowed down.
        let fresh = || channel(b.addr);
        let p = f.path();
        let none = f.call(&fresh().await, MetadataMap::new()).await;
        assert_eq!(
            none.code(),
            tonic::Code::Unauthenticated,
            "{f:?} unsigned: {none:?}"
        );
        let wrong = f
            .call(
                &fresh().await,
                signed(p, "admin", "not the admin secret", now_ms()),
            )
            .await;
        let unknown = f
            .call(&fresh().await, signed(p, "nobody", ADMIN_SECRET, now_ms()))
            .await;
        assert_eq!(
            wrong.code(),
            tonic::Code::Unauthenticated,
            "{f:?} wrong secret"
        );
        assert_eq!(
            unknown.code(),
            tonic::Code::Unauthenticated,
            "{f:?} unknown user"
        );
        // The answer does not tell an unknown user from a wrong secret.
        assert_eq!(wrong.message(), unknown.message());
        let stale = f
            .call(
                &fresh().await,
                signed(p, "admin", ADMIN_SECRET, now_ms() - 600_000),
            )
            .await;
        assert_eq!(stale.code(), tonic::Code::Unauthenticated, "{f:?} stale");
        assert!(stale.message().contains("clock"), "{}", stale.message());
        // The same signed request twice: the first passes authentication
        // (the admin holds no pub, sub or tx: it may then be denied), the
        // second is a replay.
        let md = signed(p, "admin", ADMIN_SECRET, now_ms());
        let first = f.call(&fresh().await, md.clone()).await;
        assert_ne!(
            first.code(),
            tonic::Code::Unauthenticated,
            "{f:?} first: {first:?}"
        );
        let again = f.call(&fresh().await, md).await;
        assert_eq!(again.code(), tonic::Code::Unauthenticated, "{f:?} replayed");
        assert!(again.message().contains("replay"), "{}", again.message());
    }
    // The admin's requests that its policy allows get through.
    let ok = Family::ListUsers
        .call(
            &channel(b.addr).await,
            signed(Family::ListUsers.path(), "admin", ADMIN_SECRET, now_ms()),
        )
        .await;
    assert_eq!(ok.code(), tonic::Code::Ok, "{ok:?}");
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_the_permission_nothing_is_stored_or_changed() {
    let dir = tempfile::tempdir().unwrap();
    let app = vec![
        Rule::topic("orders", &["pub"]),
        Rule::producer_group("pg", &["tx"]),
    ];
    let bill = vec![
        Rule::topic("orders", &["sub"]),
        Rule::group("billing", &["sub"]),
    ];
    let eve = vec![
        Rule::topic("other", &["pub"]),
        Rule::producer_group("evil-pg", &["tx"]),
    ];
    let (b, admin, users, secrets) =
        setup(dir.path(), &[("app", app), ("bill", bill), ("eve", eve)]).await;
    let (app, bill, eve) = (&users[0], &users[1], &users[2]);
    let ad = Admin::new(admin.clone());
    ad.create_topic("orders", 1).await.unwrap();

    // Sends: denied without pub, nothing stored.
    let no_batch = halfmq_client::ProducerOptions {
        auto_batch: false,
        ..Default::default()
    };
    let eve_p = Producer::with_options(eve.clone(), no_batch.clone());
    let r = eve_p.send(Message::new("orders", "forged")).await;
    assert_eq!(grpc(&r), tonic::Code::PermissionDenied);
    let ClientError::Transport(s) = r.unwrap_err() else {
        unreachable!()
    };
    assert!(
        s.message().contains("pub on topic:orders"),
        "{}",
        s.message()
    );
    assert_eq!(ad.stats().await.unwrap().messages_in, 0);
    // With it: stored.
    let app_p = Producer::with_options(app.clone(), no_batch);
    app_p.send(Message::new("orders", "order 1")).await.unwrap();
    assert_eq!(ad.stats().await.unwrap().messages_in, 1);

    // Topics: eve cannot create, delete or see them.
    assert_eq!(
        grpc(&Admin::new(eve.clone()).create_topic("evil", 1).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        grpc(&Admin::new(eve.clone()).delete_topic("orders").await),
        tonic::Code::PermissionDenied
    );
    let names: Vec<String> = ad
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["orders".to_owned()]);
    assert!(Admin::new(eve.clone())
        .list_topics()
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        Admin::new(app.clone()).list_topics().await.unwrap().len(),
        1
    );
    assert_eq!(
        grpc(&Admin::new(eve.clone()).stats().await),
        tonic::Code::PermissionDenied
    );

    // Receives and acks: only with sub on the group (and the topic).
    let eve_c = Consumer::new(eve.clone(), "billing", "orders");
    assert_eq!(
        grpc(&eve_c.receive(1, Duration::ZERO).await),
        tonic::Code::PermissionDenied
    );
    let bill_c = Consumer::new(bill.clone(), "billing", "orders")
        .with_invisible_duration(Duration::from_secs(30));
    let got = bill_c.receive(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        grpc(&eve_c.ack(&got[0]).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        grpc(&eve_c.nack(&got[0], "x", None).await),
        tonic::Code::PermissionDenied
    );
    // Still in flight for bill: its ack succeeds (eve's did nothing).
    let st = ad.stats().await.unwrap();
    assert_eq!(st.acks, 0);
    bill_c.ack(&got[0]).await.unwrap();
    assert_eq!(ad.stats().await.unwrap().acks, 1);
    // bill may not receive from another topic with the same group.
    ad.create_topic("other", 1).await.unwrap();
    let bill_other = Consumer::new(bill.clone(), "billing", "other");
    assert_eq!(
        grpc(&bill_other.receive(1, Duration::ZERO).await),
        tonic::Code::PermissionDenied
    );

    // Transactions: a half needs pub on its topic and tx on its group; its
    // end needs tx on the half's group.
    let app_tx = TransactionProducer::new(app.clone(), "pg", |_: MessageView| async {
        TransactionResolution::Unknown
    });
    let half = app_tx
        .send_half(Message::new("orders", "tx body"))
        .await
        .unwrap();
    let eve_tx = TransactionProducer::new(eve.clone(), "pg", |_: MessageView| async {
        TransactionResolution::Commit
    });
    assert_eq!(
        grpc(&eve_tx.send_half(Message::new("other", "x")).await),
        tonic::Code::PermissionDenied
    );
    let end = halfmq_client::end_transaction(
        eve,
        &half.transaction_id,
        TransactionResolution::Commit,
        halfmq_client::EndSource::Producer,
    )
    .await;
    assert_eq!(grpc(&end), tonic::Code::PermissionDenied);
    let by_hand = halfmq_client::end_transaction(
        app,
        &half.transaction_id,
        TransactionResolution::Commit,
        halfmq_client::EndSource::Operator,
    )
    .await;
    assert_eq!(
        grpc(&by_hand),
        tonic::Code::PermissionDenied,
        "ending by hand needs admin"
    );
    // A TransactionBatch whose halves eve may send but whose end she may
    // not: refused whole, its halves not stored.
    let path = "/halfmq.v1.Producer/TransactionBatch";
    let batch = pb::TransactionBatchRequest {
        producer_group: "evil-pg".into(),
        halves: vec![pb::Message {
            topic: "other".into(),
            body: bytes::Bytes::from_static(b"half of eve"),
            ..Default::default()
        }],
        ends: vec![pb::EndTransactionRequest {
            transaction_id: half.transaction_id.clone(),
            resolution: pb::Resolution::Commit as i32,
            ..Default::default()
        }],
    };
    let mut req = tonic::Request::new(batch);
    *req.metadata_mut() = signed(path, "eve", &secrets[2], now_ms());
    let refused = pb::producer_client::ProducerClient::new(channel(b.addr).await)
        .transaction_batch(req)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("tx on producer-group:pg"),
        "{}",
        refused.message()
    );
    let pending = ad.list_transactions().await.unwrap();
    assert_eq!(
        pending.len(),
        1,
        "the half is still pending, and eve's was not stored"
    );
    // Listings show only what the caller may see.
    assert!(Admin::new(eve.clone())
        .list_transactions()
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        Admin::new(app.clone())
            .list_transactions()
            .await
            .unwrap()
            .len(),
        1
    );
    half.commit().await.unwrap();
    assert!(ad.list_transactions().await.unwrap().is_empty());

    // DLQ and offsets: admin only.
    assert_eq!(
        grpc(&Admin::new(bill.clone()).purge_dead_letters("billing").await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        grpc(
            &Admin::new(bill.clone())
                .redrive_dead_letters("billing", None)
                .await
        ),
        tonic::Code::PermissionDenied
    );
    let reset = Admin::new(bill.clone())
        .reset_offset("billing", "orders", halfmq_client::ResetTo::Earliest)
        .await;
    assert_eq!(grpc(&reset), tonic::Code::PermissionDenied);
    // Users and policies: admin only; eve cannot grant herself anything.
    let sec = Security::new(eve.clone());
    assert_eq!(
        grpc(&sec.create_user("mallory").await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        grpc(&sec.grant("eve", &Rule::cluster(&["admin"])).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        Security::new(admin.clone())
            .list_users(None)
            .await
            .unwrap()
            .len(),
        4
    );
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_session_without_tx_gets_no_check_backs() {
    let dir = tempfile::tempdir().unwrap();
    let app = vec![
        Rule::topic("orders", &["pub", "sub"]),
        Rule::group("g", &["sub"]),
        Rule::producer_group("pg", &["tx"]),
    ];
    let eve = vec![
        Rule::topic("orders", &["pub"]),
        Rule::producer_group("evil-pg", &["tx"]),
    ];
    let (b, admin, users, _) = setup(dir.path(), &[("app", app), ("eve", eve)]).await;
    Admin::new(admin.clone())
        .create_topic("orders", 1)
        .await
        .unwrap();
    // The half's producer goes away before it ends it.
    let sender = TransactionProducer::new(users[0].clone(), "pg", |_: MessageView| async {
        TransactionResolution::Unknown
    });
    let half = sender
        .send_half(Message::new("orders", "order 7"))
        .await
        .unwrap();
    drop(sender);
    // eve's session for pg is refused: it is never a checker of pg.
    let eve_checks = Arc::new(AtomicU32::new(0));
    let n = Arc::clone(&eve_checks);
    let eve_tx = TransactionProducer::new(users[1].clone(), "pg", move |_: MessageView| {
        n.fetch_add(1, Ordering::SeqCst);
        async { TransactionResolution::Commit }
    });
    assert!(!eve_tx.wait_session(Duration::from_secs(1)).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(eve_checks.load(Ordering::SeqCst), 0);
    let pending = Admin::new(admin.clone()).list_transactions().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].transaction_id, half.transaction_id);
    // A session of a user holding tx on pg gets the check-back and decides.
    let app_checks = Arc::new(AtomicU32::new(0));
    let n = Arc::clone(&app_checks);
    let checker = TransactionProducer::new(users[0].clone(), "pg", move |_: MessageView| {
        n.fetch_add(1, Ordering::SeqCst);
        async { TransactionResolution::Commit }
    });
    assert!(checker.wait_session(Duration::from_secs(5)).await);
    let c = Consumer::new(users[0].clone(), "g", "orders");
    let got = c.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1, "committed by the check-back");
    assert!(app_checks.load(Ordering::SeqCst) >= 1);
    assert_eq!(eve_checks.load(Ordering::SeqCst), 0);
    // Revoking tx ends the session: it is refused from then on.
    Security::new(admin.clone())
        .revoke("app", &Rule::producer_group("pg", &["tx"]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while checker.wait_session(Duration::from_millis(50)).await {
        assert!(
            Instant::now() < deadline,
            "the session outlived its permission"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn prefix_and_deny_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = vec![
        Rule::topic("orders-*", &["pub"]),
        Rule::topic("orders-secret", &["pub"]).denied(),
    ];
    let (b, admin, users, _) = setup(dir.path(), &[("app", rules)]).await;
    let p = Producer::new(users[0].clone());
    p.send(Message::new("orders-eu", "a")).await.unwrap();
    p.send(Message::new("orders-us", "b")).await.unwrap();
    assert_eq!(
        grpc(&p.send(Message::new("orders-secret", "c")).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        grpc(&p.send(Message::new("orders", "d")).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        grpc(&p.send(Message::new("audit", "e")).await),
        tonic::Code::PermissionDenied
    );
    // A batch with one refused topic stores nothing of it.
    let before = Admin::new(admin.clone()).stats().await.unwrap().messages_in;
    let batch = p
        .send_batch(vec![
            Message::new("orders-eu", "f"),
            Message::new("orders-secret", "g"),
        ])
        .await;
    assert_eq!(grpc(&batch), tonic::Code::PermissionDenied);
    assert_eq!(
        Admin::new(admin.clone()).stats().await.unwrap().messages_in,
        before
    );
    // A grant or revoke applies to the next request.
    let sec = Security::new(admin.clone());
    sec.revoke("app", &Rule::topic("orders-*", &["pub"]))
        .await
        .unwrap();
    assert_eq!(
        grpc(&p.send(Message::new("orders-eu", "h")).await),
        tonic::Code::PermissionDenied
    );
    sec.grant("app", &Rule::topic("*", &["pub"])).await.unwrap();
    p.send(Message::new("audit", "i")).await.unwrap();
    assert_eq!(
        grpc(&p.send(Message::new("orders-secret", "j")).await),
        tonic::Code::PermissionDenied
    );
    // Bad rules are refused with a reason.
    let bad = sec
        .grant("app", &Rule::topic("orders", &["tx"]))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("cannot be granted"), "{bad}");
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn users_and_policies_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _admin, users, _) = setup(
        dir.path(),
        &[("app", vec![Rule::topic("orders", &["pub"])])],
    )
    .await;
    Producer::new(users[0].clone())
        .send(Message::new("orders", "1"))
        .await
        .unwrap();
    b.shutdown().await.unwrap();
    // Another HALFMQ_ADMIN_SECRET at the next start changes nothing: an
    // admin exists.
    let mut cfg = auth_config(dir.path());
    cfg.auth.admin_secret = Some(SecretString::new("another secret, ignored"));
    let b = start(cfg).await;
    let addr = b.addr.to_string();
    let old = as_user(&addr, "admin", ADMIN_SECRET).await;
    let users_now = Security::new(old.clone()).list_users(None).await.unwrap();
    assert_eq!(
        users_now
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        ["admin", "app"]
    );
    assert_eq!(users_now[1].rules, vec![Rule::topic("orders", &["pub"])]);
    let new = as_user(&addr, "admin", "another secret, ignored").await;
    assert_eq!(
        grpc(&Admin::new(new).list_topics().await),
        tonic::Code::Unauthenticated
    );
    // The user's client (its secret) works as before.
    let p = Producer::new(
        Client::connect_with(
            &addr,
            ClientOptions {
                credentials: users[0].credentials().cloned(),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    p.send(Message::new("orders", "2")).await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn repeated_failures_on_one_connection_are_slowed_down() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _admin, _, _) = setup(dir.path(), &[]).await;
    let ch = channel(b.addr).await;
    let mut took = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        let s = Family::ListTopics.call(&ch, MetadataMap::new()).await;
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        took.push(t.elapsed());
    }
    // The first three at once; from the fourth 100 ms, 200 ms, then the
    // configured maximum (400 ms).
    assert!(took[0] < Duration::from_millis(90), "{took:?}");
    assert!(took[4] >= Duration::from_millis(200), "{took:?}");
    assert!(took[5] >= Duration::from_millis(400), "{took:?}");
    // Another connection is not slowed down.
    let t = Instant::now();
    Family::ListTopics
        .call(&channel(b.addr).await, MetadataMap::new())
        .await;
    assert!(t.elapsed() < Duration::from_millis(90));
    b.shutdown().await.unwrap();
}

async fn tls_client(addr: &str, tls: Option<TlsOptions>) -> Client {
    let opts = ClientOptions {
        tls,
        max_attempts: 1,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    Client::connect_with(addr, opts).await.unwrap()
}

#[tokio::test]
async fn tls_and_mtls_handshakes_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "a");
    let other = certs(dir.path(), "b");
    let mut cfg = test_config(&dir.path().join("data"));
    cfg.tls.cert = c.server_cert.clone();
    cfg.tls.key = c.server_key.clone();
    let b = start(cfg).await;
    let addr = b.addr.to_string();
    let ca_only = TlsOptions::from_files(&c.ca, None).unwrap();
    Admin::new(tls_client(&addr, Some(ca_only.clone())).await)
        .create_topic("t", 1)
        .await
        .unwrap();
    // Plaintext: refused.
    assert!(Admin::new(tls_client(&addr, None).await)
        .list_topics()
        .await
        .is_err());
    // A certificate of another CA is not trusted by the client.
    let wrong_ca = TlsOptions::from_files(&other.ca, None).unwrap();
    assert!(Admin::new(tls_client(&addr, Some(wrong_ca)).await)
        .list_topics()
        .await
        .is_err());
    b.shutdown().await.unwrap();

    // mTLS: a client certificate the client CA signed is required.
    let mut cfg = test_config(&dir.path().join("data2"));
    cfg.tls.cert = c.server_cert.clone();
    cfg.tls.key = c.server_key.clone();
    cfg.tls.client_ca = c.ca.clone();
    let b = start(cfg).await;
    let addr = b.addr.to_string();
    assert!(Admin::new(tls_client(&addr, Some(ca_only)).await)
        .list_topics()
        .await
        .is_err());
    let foreign =
        TlsOptions::from_files(&c.ca, Some((&other.client_cert, &other.client_key))).unwrap();
    assert!(Admin::new(tls_client(&addr, Some(foreign)).await)
        .list_topics()
        .await
        .is_err());
    let mine = TlsOptions::from_files(&c.ca, Some((&c.client_cert, &c.client_key))).unwrap();
    let topics = Admin::new(tls_client(&addr, Some(mine)).await)
        .list_topics()
        .await
        .unwrap();
    assert!(topics.is_empty());
    assert!(Admin::new(tls_client(&addr, None).await)
        .list_topics()
        .await
        .is_err());
    b.shutdown().await.unwrap();
}

#[test]
fn a_non_loopback_listener_needs_auth_or_allow_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.listen = "0.0.0.0:0".into();
    let e = cfg.validate().unwrap_err();
    assert_eq!(e.key, "auth.enabled");
    assert!(e.reason.contains("allow_anonymous"), "{}", e.reason);
    cfg.auth.allow_anonymous = true;
    cfg.validate().unwrap();
    cfg.auth.allow_anonymous = false;
    cfg.auth.enabled = true;
    cfg.validate().unwrap();
    // Auth on without an admin and without HALFMQ_ADMIN_SECRET: refused.
    let e = halfmq_broker::Broker::open(cfg, Arc::new(halfmq_broker::SystemClock)).unwrap_err();
    assert!(e.to_string().contains("HALFMQ_ADMIN_SECRET"), "{e}");
}
