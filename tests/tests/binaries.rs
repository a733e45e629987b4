//! The real binaries: `halfmq-broker` (config errors, SIGTERM, SIGKILL) and
//! the `halfmq` CLI.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use halfmq_client::{Client, Consumer, Message, Producer};
use halfmq_tests::{binary, BrokerProcess};

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("bad.toml");
    std::fs::write(&toml, "flush = \"sometimes\"\n").unwrap();
    let data_dir = dir.path().to_str().unwrap();
    for (args, key) in [
        (
            vec!["--data-dir", data_dir, "--default-queues", "0"],
            "default_queues",
        ),
        (vec!["--config", toml.to_str().unwrap()], "flush"),
        (
            vec!["--data-dir", data_dir, "--worker-threads", "100000"],
            "worker_threads",
        ),
        (
            vec!["--data-dir", data_dir, "--read-cache-bytes", "2000000000"],
            "read_cache_bytes",
        ),
        (
            vec!["--data-dir", data_dir, "--sync-wait-spin", "20ms"],
            "sync_wait_spin_us",
        ),
    ] {
        let out = Command::new(binary("halfmq-broker"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{args:?}: {err}");
    }
}

#[test]
fn cli_send_and_consume_json() {
    let dir = tempfile::tempdir().unwrap();
    // One runtime thread: the broker must serve everything on it.
    let b = BrokerProcess::start(dir.path(), &["--worker-threads", "1"]);
    let cli = |args: &[&str]| b.cli(args);
    let (ok, out, err) = cli(&["topic", "create", "cli", "--queues", "2"]);
    assert!(ok, "{err}");
    let (ok, out2, err) = cli(&[
        "send", "cli", "héllo", "--tag", "t", "--key", "k", "--count", "3", "--json",
    ]);
    assert!(ok, "{err}");
    let sent: Vec<serde_json::Value> = out2
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sent.len(), 3);
    let (ok, out3, err) = cli(&[
        "consume",
        "cli",
        "--group",
        "g",
        "--count",
        "3",
        "--timeout",
        "2s",
        "--json",
    ]);
    assert!(ok, "{err}");
    let got: Vec<serde_json::Value> = out3
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 3, "{out3}");
    let sent_ids: HashSet<_> = sent
        .iter()
        .map(|v| v["message_id"].as_str().unwrap().to_owned())
        .collect();
    for g in &got {
        assert!(sent_ids.contains(g["message_id"].as_str().unwrap()));
        assert_eq!(g["body"], "héllo");
        assert_eq!(g["body_encoding"], "utf8");
        assert_eq!(g["tag"], "t");
        assert_eq!(g["keys"][0], "k");
        assert_eq!(g["reconsume_times"], 0);
        for k in ["topic", "queue_id", "queue_offset"] {
            assert!(g.get(k).is_some(), "missing {k}");
        }
    }
    let (ok, out4, _) = cli(&["topic", "list", "--json"]);
    assert!(ok && out4.contains("\"name\":\"cli\""), "{out4} {out}");
    let (ok, out5, _) = cli(&["stats", "--json"]);
    assert!(ok);
    let s: serde_json::Value = serde_json::from_str(out5.trim()).unwrap();
    assert_eq!(s["messages_in"], 3);
    // A failing send exits non-zero.
    let (ok, _, err) = cli(&["send", "%nope", "x"]);
    assert!(!ok && err.contains("reserved"), "{err}");
    assert!(b.terminate().success(), "clean exit on SIGTERM");
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `halfmq tx` commands end to end, with their JSON fields: a crashed
/// producer's half resolved by a checker, a rollback, halves given up after
/// `--check-max` unknown answers and then resolved by hand.
#[test]
fn cli_tx_send_checker_pending_end() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(
        dir.path(),
        &[
            "--transaction-timeout",
            "500ms",
            "--check-interval",
            "300ms",
            "--check-max",
            "2",
        ],
    );
    let cli = |args: &[&str]| b.cli(args);
    let (ok, _, err) = cli(&["topic", "create", "txcli", "--queues", "1"]);
    assert!(ok, "{err}");

    // A crashed producer: no EndTransaction.
    let (ok, out, err) = cli(&[
        "tx", "send", "txcli", "crashed", "--group", "pg", "--local", "exit", "--json",
    ]);
    assert!(ok, "{err}");
    let sent = json_lines(&out);
    assert_eq!(sent.len(), 1, "{out}");
    let crashed_tx = sent[0]["transaction_id"].as_str().unwrap().to_owned();
    let crashed_id = sent[0]["message_id"].as_str().unwrap().to_owned();
    let (ok, out, err) = cli(&["tx", "pending", "--json"]);
    assert!(ok, "{err}");
    let pending = json_lines(&out);
    assert_eq!(pending.len(), 1, "{out}");
    let p = &pending[0];
    assert_eq!(p["transaction_id"], crashed_tx.as_str());
    assert_eq!(p["message_id"], crashed_id.as_str());
    assert_eq!(p["topic"], "txcli");
    assert_eq!(p["producer_group"], "pg");
    assert_eq!(p["check_times"], 0);
    assert_eq!(p["given_up"], false);
    assert!(p["age_ms"].is_u64(), "{p}");
    // Another instance of the group answers the check-back with commit.
    let (ok, out, err) = cli(&[
        "tx", "checker", "--group", "pg", "--answer", "commit", "--for", "2s",
    ]);
    assert!(ok, "{err}");
    let checks = json_lines(&out);
    assert_eq!(checks.len(), 1, "one check, answered commit: {out}");
    assert_eq!(checks[0]["transaction_id"], crashed_tx.as_str());
    assert_eq!(checks[0]["message_id"], crashed_id.as_str());
    assert_eq!(checks[0]["topic"], "txcli");
    assert_eq!(
        checks[0]["check_times"], 1,
        "check-backs are counted from 1"
    );

    // A rolled-back transaction is never delivered.
    let (ok, _, err) = cli(&[
        "tx", "send", "txcli", "rolled", "--group", "pg", "--local", "rollback",
    ]);
    assert!(ok, "{err}");

    // Unknown to every check: given up after --check-max 2 checks.
    let (ok, out, err) = cli(&[
        "tx", "send", "txcli", "unsure", "--group", "pg2", "--count", "2", "--local", "unknown",
        "--for", "20s", "--json",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("2 given up"), "{err}");
    let unsure: Vec<String> = json_lines(&out)
        .iter()
        .map(|v| v["transaction_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(unsure.len(), 2, "{out}");
    let (ok, out, err) = cli(&["tx", "pending", "--json"]);
    assert!(ok, "{err}");
    let pending = json_lines(&out);
    assert_eq!(pending.len(), 2, "{out}");
    for p in &pending {
        assert!(unsure.contains(&p["transaction_id"].as_str().unwrap().to_owned()));
        assert_eq!(p["given_up"], true, "{p}");
        assert_eq!(p["check_times"], 2, "{p}");
    }
    // By hand: commit one (twice: the same answer again is fine), roll the
    // other back; a conflicting or unknown end exits non-zero.
    let (ok, out, err) = cli(&["tx", "end", &unsure[0], "--commit"]);
    assert!(ok, "{out} {err}");
    let (ok, _, err) = cli(&["tx", "end", &unsure[0], "--commit"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["tx", "end", &unsure[0], "--rollback"]);
    assert!(!ok && err.contains("first resolution is final"), "{err}");
    let (ok, _, err) = cli(&["tx", "end", &unsure[1], "--rollback"]);
    assert!(ok, "{err}");
    // Well formed, but no half at that physical offset.
    let unknown_tx = format!("0FFFFFFFFFFFFFFF{}", &crashed_tx[16..]);
    let (ok, _, err) = cli(&["tx", "end", &unknown_tx, "--commit"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
    let (ok, out, err) = cli(&["tx", "pending", "--json"]);
    assert!(ok && out.trim().is_empty(), "{out} {err}");

    // Delivered: the checker's commit and the hand commit, once each.
    let (ok, out, err) = cli(&[
        "consume",
        "txcli",
        "--group",
        "g",
        "--count",
        "10",
        "--timeout",
        "1s",
        "--json",
    ]);
    assert!(ok, "{err}");
    let mut bodies: Vec<String> = json_lines(&out)
        .iter()
        .map(|v| v["body"].as_str().unwrap().to_owned())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["crashed", "unsure"], "{out}");
    assert!(b.terminate().success(), "clean exit on SIGTERM");
}

#[test]
fn sigkill_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let rt = halfmq_tests::runtime();
    let mut acked = HashSet::new();
    for round in 0..3 {
        let b = BrokerProcess::start(dir.path(), &[]);
        let addr = b.addr.clone();
        // Producers run while the broker is killed under them.
        let got = rt.block_on(async move {
            let c = Client::connect(&addr).await.unwrap();
            let p = Producer::new(c);
            let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut hs = Vec::new();
            for t in 0..8 {
                let p = p.clone();
                let acked = acked.clone();
                hs.push(tokio::spawn(async move {
                    for i in 0.. {
                        match p
                            .send(Message::new("crash", format!("r{round}-t{t}-{i}")))
                            .await
                        {
                            Ok(r) => acked.lock().unwrap().push(r.message_id),
                            Err(_) => break,
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(300 + 200 * round)).await;
            (acked, hs)
        });
        b.kill9();
        let (acked_now, hs) = got;
        rt.block_on(async {
            for h in hs {
                let _ = h.await;
            }
        });
        acked.extend(acked_now.lock().unwrap().drain(..));
    }
    assert!(acked.len() > 50, "only {} sends acknowledged", acked.len());
    let b = BrokerProcess::start(dir.path(), &[]);
    let addr = b.addr.clone();
    let delivered = rt.block_on(async move {
        let c = Consumer::new(Client::connect(&addr).await.unwrap(), "verify", "crash");
        let mut seen = HashSet::new();
        loop {
            let msgs = c.receive(256, Duration::from_millis(500)).await.unwrap();
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                c.ack(&m).await.unwrap();
                seen.insert(m.message_id);
            }
        }
        seen
    });
    let lost: Vec<_> = acked.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    b.kill9();
}
