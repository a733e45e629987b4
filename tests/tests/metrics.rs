//! The HTTP endpoint: `/healthz`, `/readyz`, and `/metrics` parsed by a
//! Prometheus text parser while messages flow; with auth on, `/metrics`
//! refuses anonymous scrapes unless `metrics_anonymous`.

use std::net::SocketAddr;
use std::time::Duration;

use halfmq_client::{Client, ClientOptions, Consumer, Credentials, Message, Producer};
use halfmq_tests::{start, test_config};

/// A GET over HTTP/1.1: (status, body).
fn get(addr: SocketAddr, path: &str, basic: Option<&str>) -> (u16, String) {
    let auth: Vec<String> = basic
        .map(|b| format!("Authorization: Basic {b}"))
        .into_iter()
        .collect();
    let (status, _, body) = halfmq_tests::http_request(addr, "GET", path, &auth, "");
    (status, body)
}

/// The value of `name` (counters with or without `_total`) with `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .find(|s| {
            (s.metric == name || s.metric == format!("{name}_total"))
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_messages_flow() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let http = b.http_addr.expect("http_listen is on");
    let (code, body) = tokio::task::spawn_blocking(move || get(http, "/healthz", None))
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = tokio::task::spawn_blocking(move || get(http, "/readyz", None))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let scrape = move || get(http, "/metrics", None);
    let (code, before) = tokio::task::spawn_blocking(scrape).await.unwrap();
    assert_eq!(code, 200, "{before}");
    assert_eq!(
        value(&before, "halfmq_messages_in", &[]),
        Some(0.0),
        "{before}"
    );
    assert!(value(&before, "halfmq_disk_free_bytes", &[]).unwrap() > 0.0);

    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..3 {
        p.send(Message::new("metered", format!("m{i}")))
            .await
            .unwrap();
    }
    let cons = Consumer::new(c.clone(), "meter-g", "metered");
    let mut got = Vec::new();
    while got.len() < 2 {
        for m in cons
            .receive(2 - got.len() as u32, Duration::from_secs(2))
            .await
            .unwrap()
        {
            cons.ack(&m).await.unwrap();
            got.push(m);
        }
    }
    let (_, after) = tokio::task::spawn_blocking(scrape).await.unwrap();
    assert_eq!(
        value(&after, "halfmq_messages_in", &[]),
        Some(3.0),
        "{after}"
    );
    assert_eq!(
        value(&after, "halfmq_messages_out", &[]),
        Some(2.0),
        "{after}"
    );
    assert_eq!(value(&after, "halfmq_acks", &[]), Some(2.0), "{after}");
    assert!(value(&after, "halfmq_bytes_in", &[]).unwrap() >= 6.0);
    let labels = [("group", "meter-g"), ("topic", "metered")];
    assert_eq!(
        value(&after, "halfmq_consumer_lag", &labels),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        value(&after, "halfmq_inflight", &labels),
        Some(0.0),
        "{after}"
    );
    assert!(value(&after, "halfmq_connections", &[]).unwrap() >= 1.0);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_metrics_need_an_admin_unless_anonymous_is_allowed() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.auth.enabled = true;
    cfg.auth.admin_secret = Some(halfmq_broker::auth::config::SecretString::new(
        "an admin secret of 16+ bytes",
    ));
    let b = start(cfg).await;
    let http = b.http_addr.unwrap();
    let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let admin = enc("admin:an admin secret of 16+ bytes");
    let wrong = enc("admin:not the secret at all");
    let (anon, (wrong_code, wrong_took), ok, health) = tokio::task::spawn_blocking(move || {
        (
            get(http, "/metrics", None).0,
            {
                let t = std::time::Instant::now();
                (get(http, "/metrics", Some(&wrong)).0, t.elapsed())
            },
            get(http, "/metrics", Some(&admin)),
            get(http, "/healthz", None).0,
        )
    })
    .await
    .unwrap();
    assert_eq!((anon, wrong_code, health), (401, 401, 200));
    // Wrong credentials are answered slowly, to slow guessing.
    assert!(wrong_took >= Duration::from_millis(450), "{wrong_took:?}");
    assert_eq!(ok.0, 200);
    assert!(value(&ok.1, "halfmq_messages_in", &[]).is_some());
    // A user without admin on cluster is refused too.
    let admin_client = Client::connect_with(
        &b.addr.to_string(),
        ClientOptions {
            credentials: Some(Credentials::new("admin", "an admin secret of 16+ bytes")),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    halfmq_client::Security::new(admin_client)
        .create_user_with_secret("reader", "a reader secret 16+")
        .await
        .unwrap();
    let reader = enc("reader:a reader secret 16+");
    let code = tokio::task::spawn_blocking(move || get(http, "/metrics", Some(&reader)).0)
        .await
        .unwrap();
    assert_eq!(code, 401);
    b.shutdown().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.auth.enabled = true;
    cfg.auth.admin_secret = Some(halfmq_broker::auth::config::SecretString::new(
        "an admin secret of 16+ bytes",
    ));
    cfg.metrics_anonymous = true;
    let b = start(cfg).await;
    let http = b.http_addr.unwrap();
    let code = tokio::task::spawn_blocking(move || get(http, "/metrics", None).0)
        .await
        .unwrap();
    assert_eq!(code, 200);
}

/// Check-backs and dead letters show in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_and_dead_letters_are_counted() {
    use halfmq_client::{TransactionProducer, TransactionResolution};
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        transaction_timeout_ms: 200,
        check_interval_ms: 200,
        max_reconsume_times: 1,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let http = b.http_addr.unwrap();
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    // A half left open: the producer's checker commits it when asked.
    let p = TransactionProducer::new(c.clone(), "pg", |_| {
        std::future::ready(TransactionResolution::Commit)
    });
    let tx = p.send_half(Message::new("checked", "h")).await.unwrap();
    drop(tx);
    // A message failed until it is dead-lettered.
    Producer::new(c.clone())
        .send(Message::new("doomed", "d"))
        .await
        .unwrap();
    let cons = Consumer::new(c.clone(), "dg", "doomed");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        for m in cons.receive(1, Duration::from_millis(200)).await.unwrap() {
            cons.nack(&m, "no", None).await.unwrap();
        }
        let text = tokio::task::spawn_blocking(move || get(http, "/metrics", None).1)
            .await
            .unwrap();
        let answered = value(&text, "halfmq_checks_answered", &[]).unwrap_or(0.0);
        let dead = value(&text, "halfmq_dlq_messages", &[("group", "dg")]).unwrap_or(0.0);
        if answered >= 1.0 && dead >= 1.0 {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
    };
    assert!(value(&text, "halfmq_checks_sent", &[]).unwrap() >= 1.0);
    assert_eq!(
        value(&text, "halfmq_transactions_committed", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "halfmq_pending_halves", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "halfmq_given_up_halves", &[]),
        Some(0.0),
        "{text}"
    );
    drop(p);
}

/// A half whose checks all answer UNKNOWN is given up after `check_max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_up_halves_are_counted() {
    use halfmq_client::{TransactionProducer, TransactionResolution};
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        transaction_timeout_ms: 100,
        check_interval_ms: 100,
        check_max: 2,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let http = b.http_addr.unwrap();
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = TransactionProducer::new(c.clone(), "pg", |_| {
        std::future::ready(TransactionResolution::Unknown)
    });
    drop(p.send_half(Message::new("undecided", "h")).await.unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = tokio::task::spawn_blocking(move || get(http, "/metrics", None).1)
            .await
            .unwrap();
        if value(&text, "halfmq_given_up_halves", &[]) == Some(1.0) {
            assert_eq!(
                value(&text, "halfmq_pending_halves", &[]),
                Some(1.0),
                "{text}"
            );
            assert!(
                value(&text, "halfmq_checks_answered", &[]).unwrap() >= 2.0,
                "{text}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(p);
}

/// The count of histogram `name` with `labels` (its `+Inf` bucket).
fn histogram_count(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than == f64::INFINITY)
                .map(|b| b.count),
            _ => None,
        })
}

/// The hot path's histograms fill as requests come, and a nack shows as a
/// scheduled retry until the retry is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histograms_and_scheduled_retries() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        retry_delays: "50ms".into(),
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let http = b.http_addr.unwrap();
    let scrape = move || get(http, "/metrics", None).1;
    let before = tokio::task::spawn_blocking(scrape).await.unwrap();
    let send = [("rpc", "halfmq.v1.Producer/Send")];
    assert_eq!(
        histogram_count(&before, "halfmq_request_seconds", &send),
        Some(0.0),
        "{before}"
    );
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..3 {
        p.send(Message::new("timed", format!("m{i}")))
            .await
            .unwrap();
    }
    let cons = Consumer::new(c.clone(), "tg", "timed");
    let mut first = Vec::new();
    while first.is_empty() {
        first = cons.receive(1, Duration::from_secs(2)).await.unwrap();
    }
    cons.nack(&first[0], "later", None).await.unwrap();
    let text = tokio::task::spawn_blocking(scrape).await.unwrap();
    assert!(
        histogram_count(&text, "halfmq_request_seconds", &send).unwrap() >= 3.0,
        "{text}"
    );
    let nack = [("rpc", "halfmq.v1.Consumer/Nack")];
    assert_eq!(
        histogram_count(&text, "halfmq_request_seconds", &nack),
        Some(1.0),
        "{text}"
    );
    // Three sends and the nack's retry record, each made durable by a flush.
    assert!(histogram_count(&text, "halfmq_fsync_seconds", &[]).unwrap() >= 1.0);
    let scrape_sum = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("halfmq_group_commit_records_sum "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert!(scrape_sum(&text).unwrap() >= 4.0, "{text}");
    assert_eq!(
        value(&text, "halfmq_retries_scheduled", &[]),
        Some(1.0),
        "{text}"
    );
    // The retry comes back; acked, nothing is scheduled any more.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    'retry: loop {
        for m in cons.receive(3, Duration::from_millis(300)).await.unwrap() {
            cons.ack(&m).await.unwrap();
            if m.body == first[0].body {
                break 'retry;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no retry");
    }
    let text = tokio::task::spawn_blocking(scrape).await.unwrap();
    assert_eq!(
        value(&text, "halfmq_retries_scheduled", &[]),
        Some(0.0),
        "{text}"
    );
    b.shutdown().await.unwrap();
}

/// With `http_listen` empty nothing listens, and the broker still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_http_listen_turns_the_endpoint_off() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        http_listen: String::new(),
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    assert!(b.http_addr.is_none());
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    Producer::new(c)
        .send(Message::new("quiet", "x"))
        .await
        .unwrap();
    b.shutdown().await.unwrap();
}

/// A group member reports its Raft role and term.
#[test]
fn a_member_reports_its_raft_role_and_term() {
    let dir = tempfile::tempdir().unwrap();
    let port = halfmq_tests::free_port();
    let http_port = halfmq_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let http_listen = format!("127.0.0.1:{http_port}");
    let peers = format!("1={listen}");
    let _b = halfmq_tests::BrokerProcess::start(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--http-listen",
            &http_listen,
            "--node-id",
            "1",
            "--peers",
            &peers,
        ],
    );
    let http: SocketAddr = http_listen.parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::net::TcpStream::connect(http)
            .ok()
            .map(|_| get(http, "/metrics", None).1)
            .unwrap_or_default();
        // Elected, and the leader's first entry of its term applied.
        if value(&text, "halfmq_raft_role", &[("role", "leader")]) == Some(1.0)
            && value(&text, "halfmq_raft_last_applied_index", &[]).unwrap_or(0.0) >= 1.0
        {
            assert_eq!(
                value(&text, "halfmq_raft_role", &[("role", "follower")]),
                Some(0.0)
            );
            assert!(
                value(&text, "halfmq_raft_term", &[]).unwrap() >= 1.0,
                "{text}"
            );
            assert_eq!(value(&text, "halfmq_raft_leader_id", &[]), Some(1.0));
            assert!(value(&text, "halfmq_raft_last_log_index", &[]).unwrap() >= 1.0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
