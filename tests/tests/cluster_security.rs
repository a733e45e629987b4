//! A broker group with auth and mTLS on (issue #19): members sign their
//! replication RPCs with the group's secret and connect to each other over
//! TLS with their certificates; users and policies made with the CLI are
//! replicated, hold after the leader is killed, and are enforced by the
//! new leader.

use std::time::{Duration, Instant};

use halfmq_client::{
    Client, ClientError, ClientOptions, Consumer, Credentials, Message, Producer, TlsOptions,
};
use halfmq_tests::certs::certs;
use halfmq_tests::cli_env;
use halfmq_tests::group::{leader_with, opts, Group};

const ADMIN_SECRET: &str = "admin secret of the group test";
const CLUSTER_SECRET: &str = "the members' shared secret";

fn grpc<T>(r: &Result<T, ClientError>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(ClientError::Transport(s)) => s.code(),
        Err(e) => panic!("expected a gRPC status, got {e}"),
    }
}

#[test]
fn a_group_with_auth_and_mtls_replicates_users_and_enforces_them_after_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "group");
    let p = |x: &std::path::Path| x.to_str().unwrap().to_owned();
    let (ca, sc, sk, cc, ck) = (
        p(&c.ca),
        p(&c.server_cert),
        p(&c.server_key),
        p(&c.client_cert),
        p(&c.client_key),
    );
    let mut g = Group::start_all_env(
        &[
            "--auth",
            "--tls-cert",
            &sc,
            "--tls-key",
            &sk,
            "--tls-client-ca",
            &ca,
            "--tls-peer-ca",
            &ca,
        ],
        &[
            ("HALFMQ_ADMIN_SECRET", ADMIN_SECRET),
            ("HALFMQ_CLUSTER_SECRET", CLUSTER_SECRET),
        ],
    );
    let addrs = g.addrs.join(",");
    let tls = TlsOptions::from_files(&c.ca, Some((&c.client_cert, &c.client_key))).unwrap();
    let with = |user: &str, secret: &str| ClientOptions {
        credentials: Some(Credentials::new(user, secret)),
        tls: Some(tls.clone()),
        ..opts()
    };
    let rt = halfmq_tests::runtime();
    let leader = leader_with(&rt, &addrs, with("admin", ADMIN_SECRET));

    // Users and policies through the CLI (secret from the environment).
    let tls_args = ["--tls-ca", &ca, "--tls-cert", &cc, "--tls-key", &ck];
    let admin_cli = |args: &[&str]| {
        let mut a = vec!["--user", "admin"];
        a.extend_from_slice(&tls_args);
        a.extend_from_slice(args);
        // The first admin is made by the first leader a moment after it
        // serves: retry a refused call for a few seconds.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ok, out, err) = cli_env(&addrs, &a, &[("HALFMQ_SECRET", ADMIN_SECRET)]);
            if ok || Instant::now() > deadline {
                assert!(ok, "halfmq {args:?}: {err}");
                return out;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let created: serde_json::Value =
        serde_json::from_str(admin_cli(&["user", "create", "app", "--json"]).trim()).unwrap();
    let secret = created["secret"].as_str().unwrap().to_owned();
    admin_cli(&[
        "acl",
        "grant",
        "app",
        "--topic",
        "orders",
        "--actions",
        "pub,sub",
    ]);
    admin_cli(&["acl", "grant", "app", "--group", "g", "--actions", "sub"]);
    let mut app_args = vec!["--user", "app"];
    app_args.extend_from_slice(&tls_args);
    app_args.extend_from_slice(&["user", "list"]);
    let (ok, _, err) = cli_env(&addrs, &app_args, &[("HALFMQ_SECRET", &secret)]);
    assert!(
        !ok && err.contains("PermissionDenied"),
        "app listed users: {err}"
    );

    let sent_before = rt.block_on(async {
        let app = Client::connect_with(&addrs, with("app", &secret))
            .await
            .unwrap();
        let p = Producer::new(app);
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(
                p.send(Message::new("orders", format!("m{i}")))
                    .await
                    .unwrap()
                    .message_id,
            );
        }
        ids
    });

    // The leader dies; the next one knows the users and enforces them.
    g.procs[leader].take().unwrap().kill9();
    let rest: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| g.addrs[i].clone())
        .collect();
    let rest = rest.join(",");
    let new_leader = leader_with(&rt, &rest, with("admin", ADMIN_SECRET));
    assert_ne!(new_leader, leader);
    rt.block_on(async {
        let app = Client::connect_with(&rest, with("app", &secret))
            .await
            .unwrap();
        let p = Producer::new(app.clone());
        for i in 20..40 {
            p.send(Message::new("orders", format!("m{i}")))
                .await
                .unwrap();
        }
        assert_eq!(
            grpc(&p.send(Message::new("other", "x")).await),
            tonic::Code::PermissionDenied
        );
        let c = Consumer::new(app, "g", "orders");
        let mut got = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < 40 && Instant::now() < deadline {
            for m in c.receive(64, Duration::from_secs(2)).await.unwrap() {
                c.ack(&m).await.unwrap();
                got.insert(String::from_utf8_lossy(&m.body).into_owned());
            }
        }
        assert_eq!(
            got.len(),
            40,
            "every message sent before and after the failover"
        );
        // Unsigned requests and a wrong secret are refused by the new leader.
        let anon = ClientOptions {
            tls: Some(tls.clone()),
            ..opts()
        };
        let anon = halfmq_client::Admin::new(Client::connect_with(&rest, anon).await.unwrap());
        assert_eq!(
            grpc(&anon.list_topics().await),
            tonic::Code::Unauthenticated
        );
        let wrong = Client::connect_with(&rest, with("app", "not the app secret"))
            .await
            .unwrap();
        assert_eq!(
            grpc(&halfmq_client::Admin::new(wrong).list_topics().await),
            tonic::Code::Unauthenticated
        );
    });
    assert_eq!(sent_before.len(), 20);
    // The killed member comes back and catches up (signed, over TLS).
    let st = halfmq_tests::group::status_with(&rt, &rest, with("admin", ADMIN_SECRET));
    let target = st.iter().map(|n| n.last_applied).max().unwrap();
    g.start(leader);
    let rules = admin_cli(&["acl", "list", "app", "--json"]);
    assert_eq!(rules.lines().count(), 2, "{rules}");
    let back = leader as u64 + 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = halfmq_tests::group::status_with(&rt, &addrs, with("admin", ADMIN_SECRET));
        let applied = st
            .iter()
            .find(|n| n.node_id == back)
            .map(|n| n.last_applied);
        if applied.is_some_and(|a| a >= target) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted member did not catch up: {applied:?} < {target}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
