//! The official RocketMQ 5 clients against halfmq, unmodified: Python
//! (PyPI `rocketmq-python-client`), Node.js (npm `rocketmq-client-nodejs`)
//! and Rust (crates.io `rocketmq` 5.0.0), each driven by a scenario script
//! under `tests/rocketmq/`, with the halfmq CLI on the other side.
//!
//! The clients are installed by `tests/rocketmq/setup.sh` (which `.ci/run`
//! calls) into `target/rocketmq-clients` (or `$HALFMQ_ROCKETMQ_CLIENTS`).
//! Without them these tests say so and pass, unless
//! `HALFMQ_ROCKETMQ_REQUIRED=1` (set by `.ci/run`), where they fail.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use halfmq_tests::BrokerProcess;
use serde_json::Value;

/// One of the three clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    Python,
    Node,
    Rust,
}

/// Each client, with the prefix its scenarios give bodies.
const EACH: [(Lang, &str); 3] = [
    (Lang::Python, "py"),
    (Lang::Node, "node"),
    (Lang::Rust, "rust"),
];

struct Clients {
    dir: PathBuf,
}

impl Clients {
    /// The installed clients, or `None` (with a message) when they are not
    /// installed and not required.
    fn find() -> Option<Clients> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let dir = std::env::var_os("HALFMQ_ROCKETMQ_CLIENTS")
            .map_or_else(|| root.join("target/rocketmq-clients"), PathBuf::from);
        let c = Clients { dir };
        let missing: Vec<&str> = [Lang::Python, Lang::Node, Lang::Rust]
            .into_iter()
            .filter(|l| !c.installed(*l))
            .map(|l| match l {
                Lang::Python => "python",
                Lang::Node => "node",
                Lang::Rust => "rust",
            })
            .collect();
        if missing.is_empty() {
            return Some(c);
        }
        let msg = format!(
            "RocketMQ clients not installed in {} ({}): run tests/rocketmq/setup.sh",
            c.dir.display(),
            missing.join(", ")
        );
        if std::env::var("HALFMQ_ROCKETMQ_REQUIRED").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        None
    }

    fn installed(&self, l: Lang) -> bool {
        match l {
            Lang::Python => self.dir.join("py/bin/python").exists(),
            Lang::Node => self
                .dir
                .join("node/node_modules/rocketmq-client-nodejs")
                .exists(),
            Lang::Rust => self.rust_bin().exists(),
        }
    }

    fn rust_bin(&self) -> PathBuf {
        self.dir
            .join("rust-target/debug/halfmq-rocketmq-rust-scenarios")
    }

    fn command_env(&self, l: Lang, addr: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rocketmq");
        let mut c = match l {
            Lang::Python => {
                let mut c = Command::new(self.dir.join("py/bin/python"));
                c.arg(scripts.join("python/scenarios.py"));
                // Its log goes under $HOME/logs: keep it in the clients' dir.
                c.env("HOME", self.dir.join("home"));
                c
            }
            Lang::Node => {
                let mut c = Command::new("node");
                c.arg(scripts.join("node/scenarios.js"));
                c.env("NODE_PATH", self.dir.join("node/node_modules"));
                c.env("HOME", self.dir.join("home"));
                c
            }
            Lang::Rust => Command::new(self.rust_bin()),
        };
        c.arg(addr).args(args).envs(env.iter().copied());
        c
    }

    /// Starts a scenario; [`Running::finish`] collects its result.
    fn spawn(&self, l: Lang, addr: &str, args: &[&str]) -> Running {
        self.spawn_env(l, addr, args, &[])
    }

    fn spawn_env(&self, l: Lang, addr: &str, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut child = self
            .command_env(l, addr, args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start the {l:?} scenario {args:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut result = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(r) = line.strip_prefix("RESULT ") {
                    result = Some(r.to_owned());
                }
            }
            let _ = tx.send(result);
        });
        Running {
            child,
            rx,
            what: format!("{l:?} {args:?}"),
        }
    }

    /// Runs a scenario to its end (at most 120 s); its RESULT.
    fn run(&self, l: Lang, addr: &str, args: &[&str]) -> Value {
        self.spawn(l, addr, args).finish()
    }

    /// [`Clients::run`] with environment variables (`RMQ_AK`, `RMQ_SK`).
    fn run_env(&self, l: Lang, addr: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
        self.spawn_env(l, addr, args, env).finish()
    }
}

struct Running {
    child: Child,
    rx: std::sync::mpsc::Receiver<Option<String>>,
    what: String,
}

impl Running {
    fn finish(mut self) -> Value {
        let got = self.rx.recv_timeout(Duration::from_secs(120));
        let status = match got {
            Ok(_) => self.child.wait().ok(),
            Err(_) => {
                let _ = self.child.kill();
                None
            }
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let tail: String = err
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        match (got, status) {
            (Ok(Some(r)), Some(s)) if s.success() => serde_json::from_str(&r)
                .unwrap_or_else(|e| panic!("{}: bad RESULT {r}: {e}", self.what)),
            (got, status) => panic!(
                "{} failed ({status:?}, result {got:?}); stderr:\n{tail}",
                self.what
            ),
        }
    }
}

/// A broker for these tests: short retry delays, 3 retries, 64 KiB
/// messages, halves checked after 2 s, every 2 s.
fn broker(dir: &std::path::Path) -> BrokerProcess {
    BrokerProcess::start(
        dir,
        &[
            "--retry-delays",
            "100ms 200ms 300ms 400ms",
            "--max-reconsume-times",
            "3",
            "--max-message-bytes",
            "65536",
            "--transaction-timeout",
            "2s",
            "--check-interval",
            "2s",
        ],
    )
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .iter()
        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
        .collect()
}

/// `halfmq consume` of up to `n` messages of `topic` in `group`, as JSON.
fn halfmq_consume(b: &BrokerProcess, group: &str, topic: &str, n: usize, wait: &str) -> Vec<Value> {
    let count = n.to_string();
    let (ok, out, err) = b.cli(&[
        "consume",
        topic,
        "--group",
        group,
        "--count",
        &count,
        "--timeout",
        wait,
        "--json",
    ]);
    assert!(ok, "halfmq consume: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// `group`'s DLQ entries (`halfmq dlq list --json`) once it holds `n`,
/// or after 30 s.
fn dlq_until(b: &BrokerProcess, group: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = b.cli(&["dlq", "list", group, "--json"]);
        assert!(ok, "{err}");
        let dead: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if dead.len() >= n || Instant::now() >= deadline {
            return dead;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn bodies(msgs: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = msgs
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn messages_cross_between_each_client_and_halfmq() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let a = b.addr.clone();
    for (l, name) in EACH {
        let topic = format!("from-{name}");
        let sent = c.run(l, &a, &["send", &topic, "2"]);
        let ids = strings(&sent, "ids");
        // The halfmq CLI sees the bodies, tags, keys and properties.
        let got = halfmq_consume(&b, "hq", &topic, 2, "5s");
        assert_eq!(bodies(&got), vec![format!("{name}-0"), format!("{name}-1")]);
        assert!(got.iter().all(|m| m["tag"] == name), "{got:?}");
        // Another RocketMQ client sees the sender's own message ids.
        let other = if l == Lang::Python {
            Lang::Rust
        } else {
            Lang::Python
        };
        let r = c.run(other, &a, &["receive", "rmq", &topic, "2"]);
        let mut seen = strings(&r, "ids");
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want, "{l:?} -> {other:?}");
    }
    // The reverse: halfmq's CLI sends, each RocketMQ client receives.
    let (ok, _, err) = b.cli(&[
        "send",
        "from-halfmq",
        "hello from halfmq",
        "--tag",
        "hq",
        "--count",
        "2",
    ]);
    assert!(ok, "{err}");
    for (l, g) in [
        (Lang::Python, "g-py"),
        (Lang::Node, "g-node"),
        (Lang::Rust, "g-rust"),
    ] {
        let r = c.run(l, &a, &["receive", g, "from-halfmq", "2"]);
        assert_eq!(
            strings(&r, "bodies"),
            vec!["hello from halfmq", "hello from halfmq"],
            "{l:?}"
        );
        // A broker-named message id: 32 hex digits.
        assert!(strings(&r, "ids").iter().all(|i| i.len() == 32), "{r}");
    }
    // Python also sees the user properties and the delivery attempt.
    let (ok, _, err) = b.cli(&["send", "props", "p"]);
    assert!(ok, "{err}");
    let r = c.run(Lang::Python, &a, &["receive", "g", "props", "1"]);
    assert_eq!(r["attempts"][0], 1, "{r}");
}

#[test]
fn transactions_commit_rollback_and_check_backs_with_each_client() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let a = b.addr.clone();
    for (l, name) in EACH {
        // Commit delivers, rollback never does.
        let topic = format!("tx-{name}");
        c.run(l, &a, &["tx", &topic]);
        let got = halfmq_consume(&b, "hq", &topic, 2, "3s");
        assert_eq!(bodies(&got), vec![format!("{name}-commit")], "{l:?}");
        // Orphaned halves: listed by `halfmq tx pending`, then decided by
        // the client's checker when the broker checks back.
        let topic = format!("orphan-{name}");
        let running = c.spawn(l, &a, &["orphan", &topic, "40"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut listed = 0;
        while Instant::now() < deadline && listed < 2 {
            let (ok, out, _) = b.cli(&["tx", "pending", "--json"]);
            assert!(ok);
            listed = out
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["topic"] == topic.as_str() && v["producer_group"] == topic.as_str())
                .count();
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(listed, 2, "{l:?}: halves in tx pending");
        let r = running.finish();
        assert_eq!(
            strings(&r, "checked"),
            vec![
                format!("{name}-orphan-commit"),
                format!("{name}-orphan-rollback")
            ],
            "{l:?}"
        );
        let got = halfmq_consume(&b, "hq", &topic, 2, "3s");
        assert_eq!(bodies(&got), vec![format!("{name}-orphan-commit")], "{l:?}");
        let (_, out, _) = b.cli(&["tx", "pending", "--json"]);
        assert!(!out.contains(&topic), "{l:?}: still pending: {out}");
    }
}

/// A half whose producer is gone is checked with another live producer
/// that declared its topic, in another language.
#[test]
fn an_orphan_of_a_gone_producer_is_checked_with_another_producer_of_the_topic() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let a = b.addr.clone();
    c.run(Lang::Python, &a, &["half", "handover", "left-to-commit"]);
    let r = c.run(Lang::Rust, &a, &["checker", "handover", "1", "30"]);
    assert_eq!(strings(&r, "checked"), vec!["left-to-commit"]);
    let got = halfmq_consume(&b, "hq", "handover", 1, "3s");
    assert_eq!(bodies(&got), vec!["left-to-commit"]);
    // While the sender lives, its halves are checked with it, not with the
    // other producer of the topic.
    let other = c.spawn(Lang::Rust, &a, &["checker", "prefer", "1", "15"]);
    std::thread::sleep(Duration::from_secs(1));
    let r = c.run(Lang::Python, &a, &["orphan", "prefer", "30"]);
    assert_eq!(
        strings(&r, "checked"),
        vec!["py-orphan-commit", "py-orphan-rollback"]
    );
    let r = other.finish();
    assert!(strings(&r, "checked").is_empty(), "checked elsewhere: {r}");
}

#[test]
fn delayed_and_fifo_messages() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let a = b.addr.clone();
    // A delay message is invisible until its time (whole seconds).
    let (ok, _, err) = b.cli(&["topic", "create", "later"]);
    assert!(ok, "{err}");
    let r = c.run(Lang::Python, &a, &["delay", "later", "3"]);
    let at_ms = r["deliver_at"].as_u64().unwrap() * 1000;
    let early = halfmq_consume(&b, "hq", "later", 1, "1s");
    let now = halfmq_storage::now_ms();
    if now + 200 < at_ms {
        assert!(early.is_empty(), "delivered before its time: {early:?}");
    }
    let got = halfmq_consume(&b, "hq", "later", 1, "6s");
    assert_eq!(bodies(&got), vec!["py-delayed"]);
    assert!(halfmq_storage::now_ms() + 50 >= at_ms);
    // FIFO: the Rust client sends 3 message groups x 8, two Python simple
    // consumers of a FIFO group consume them: each group in send order.
    let (ok, _, err) = b.cli(&["group", "create", "ordered", "--fifo"]);
    assert!(ok, "{err}");
    c.run(Lang::Rust, &a, &["fifo-send", "fifo", "3", "8"]);
    let r = c.run(Lang::Python, &a, &["fifo-consume", "ordered", "fifo", "24"]);
    let seen = strings(&r, "seen");
    assert_eq!(seen.len(), 24, "{seen:?}");
    for g in 0..3 {
        let order: Vec<usize> = seen
            .iter()
            .filter_map(|s| s.strip_prefix(&format!("g{g}-")))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(order, (0..8).collect::<Vec<_>>(), "group g{g}: {seen:?}");
    }
}

/// A FIFO push consumer retries in place, then forwards the message to
/// the DLQ itself (ForwardMessageToDeadLetterQueue).
#[test]
fn a_fifo_push_consumer_forwards_what_keeps_failing_to_the_dlq() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let (ok, _, err) = b.cli(&["group", "create", "fifo-push", "--fifo"]);
    assert!(ok, "{err}");
    let (ok, _, err) = b.cli(&["send", "t-fifo-push", "doomed", "--message-group", "m"]);
    assert!(ok, "{err}");
    let running = c.spawn(
        Lang::Python,
        &b.addr,
        &["push-fail", "fifo-push", "t-fifo-push", "10"],
    );
    let dead = dlq_until(&b, "fifo-push", 1);
    let r = running.finish();
    assert_eq!(dead.len(), 1, "DLQ {dead:?}, attempts {r}");
    assert!(
        dead[0].to_string().contains("forwarded by the consumer"),
        "{dead:?}"
    );
}

#[test]
fn push_consumers_that_fail_send_messages_to_the_dlq() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let a = b.addr.clone();
    for (l, g) in [(Lang::Python, "push-py"), (Lang::Node, "push-node")] {
        let topic = format!("t-{g}");
        let (ok, _, err) = b.cli(&["send", &topic, "doomed", "--count", "2"]);
        assert!(ok, "{err}");
        let running = c.spawn(l, &a, &["push-fail", g, &topic, "12"]);
        let dead = dlq_until(&b, g, 2);
        let r = running.finish();
        assert_eq!(dead.len(), 2, "{l:?}: DLQ {dead:?}, attempts {r}");
        // Every delivery before the DLQ was seen, numbered from 1.
        let attempts: Vec<u64> = r["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert!(
            attempts.contains(&1) && attempts.iter().all(|a| (1..=4).contains(a)),
            "{l:?}: {attempts:?}"
        );
    }
}

/// A push consumer receives with `auto_renew`: a message it works on for
/// longer than the invisible duration is not delivered again meanwhile.
#[test]
fn auto_renew_keeps_a_slow_push_consumers_message_invisible() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Without renewal, each would be delivered again 1.5 s + 300 ms later.
    let b = BrokerProcess::start(
        dir.path(),
        &[
            "--default-invisible-duration",
            "1500ms",
            "--retry-delays",
            "100ms 200ms 300ms",
        ],
    );
    let (ok, _, err) = b.cli(&["send", "slow", "s", "--count", "2"]);
    assert!(ok, "{err}");
    let r = c.run(
        Lang::Python,
        &b.addr,
        &["push-slow", "slow-g", "slow", "4", "2"],
    );
    // Each message once, first attempt, though each took 4 s against an
    // invisible duration of 1.5 s.
    let seen = r["seen"].as_array().unwrap();
    assert_eq!(seen.len(), 2, "{r}");
    assert!(seen.iter().all(|s| s[1] == 1), "{r}");
    // Acked: nothing left for the group.
    let (ok, out, _) = b.cli(&["stats", "--json"]);
    assert!(ok);
    assert!(out.contains("slow-g"), "{out}");
    let got = halfmq_consume(&b, "slow-g", "slow", 2, "3s");
    assert!(got.is_empty(), "redelivered after the acks: {got:?}");
}

#[test]
fn bad_input_gets_the_right_code_and_the_broker_keeps_serving() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let a = b.addr.clone();
    // The Rust client does not read the broker's max body size: the
    // broker refuses it.
    let r = c.run(Lang::Rust, &a, &["bad", "bad-rust", "200000"]);
    assert_eq!(r["oversized"], "MESSAGE_BODY_TOO_LARGE", "{r}");
    assert_eq!(r["bad_topic"], "ILLEGAL_TOPIC", "{r}");
    // Python and Node take max_body_size from the broker's Settings and
    // refuse the body themselves; a stale receipt handle is refused.
    let r = c.run(Lang::Python, &a, &["bad", "bad-py", "200000"]);
    assert_eq!(r["stale_ack"], 40013, "{r}");
    assert_eq!(r["after_bad"], "after-bad", "{r}");
    assert_ne!(r["oversized"], "accepted", "{r}");
    let r = c.run(Lang::Node, &a, &["bad", "bad-node", "200000"]);
    assert!(
        r["oversized"]
            .as_str()
            .unwrap_or_default()
            .contains("65536"),
        "{r}"
    );
    // Still serving: what came after the refusals was stored once.
    let got = halfmq_consume(&b, "hq", "bad-rust", 2, "3s");
    assert_eq!(bodies(&got), vec!["after-bad"]);
    let got = halfmq_consume(&b, "hq", "bad-node", 2, "3s");
    assert_eq!(bodies(&got), vec!["after-bad"]);
}

/// With auth on, RocketMQ clients sign with a halfmq user's RocketMQ
/// secret key (MQv2-HMAC-SHA1) and get that user's policy; a wrong key is
/// UNAUTHORIZED, a missing permission FORBIDDEN, and nothing is stored.
#[test]
fn signed_requests_and_policies_apply_to_rocketmq_clients() {
    let Some(c) = Clients::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let admin = [
        ("HALFMQ_USER", "admin"),
        ("HALFMQ_SECRET", "an admin secret of 16+ bytes"),
    ];
    let b = BrokerProcess::start_env(
        dir.path(),
        &["--auth"],
        &[("HALFMQ_ADMIN_SECRET", admin[1].1)],
    );
    let a = b.addr.clone();
    let cli = |args: &[&str]| {
        let (ok, out, err) = halfmq_tests::cli_env(&a, args, &admin);
        assert!(ok, "{args:?}: {err}");
        out
    };
    let created: Value =
        serde_json::from_str(cli(&["user", "create", "alice", "--json"]).trim()).unwrap();
    let sk = created["rocketmq_secret_key"].as_str().unwrap().to_owned();
    for (flag, name, actions) in [
        ("--topic", "secure", "pub,sub"),
        ("--producer-group", "secure", "tx"),
        ("--group", "sg", "sub"),
    ] {
        cli(&["acl", "grant", "alice", flag, name, "--actions", actions]);
    }
    cli(&["topic", "create", "secure"]);
    cli(&["topic", "create", "other"]);
    // The admin reads what was stored.
    for (flag, name) in [
        ("--group", "x"),
        ("--topic", "secure"),
        ("--topic", "other"),
    ] {
        cli(&["acl", "grant", "admin", flag, name, "--actions", "sub"]);
    }
    let alice = [("RMQ_AK", "alice"), ("RMQ_SK", sk.as_str())];
    // Signed by each client (lower-case hex, upper-case hex, RFC 3339 times).
    c.run_env(Lang::Python, &a, &["send", "secure", "1"], &alice);
    c.run_env(Lang::Node, &a, &["send", "secure", "1"], &alice);
    c.run_env(Lang::Rust, &a, &["send", "secure", "1"], &alice);
    let r = c.run_env(Lang::Rust, &a, &["receive", "sg", "secure", "3"], &alice);
    let mut got = strings(&r, "bodies");
    got.sort();
    assert_eq!(got, vec!["node-0", "py-0", "rust-0"]);
    // A transaction needs tx on the topic's producer group: alice has it.
    c.run_env(Lang::Python, &a, &["tx", "secure"], &alice);
    // No permission on "other": FORBIDDEN; a wrong key or none:
    // UNAUTHORIZED (the Rust client reports codes).
    let r = c.run_env(Lang::Rust, &a, &["try-send", "other"], &alice);
    assert_eq!(r["outcome"], "FORBIDDEN", "{r}");
    let wrong = [("RMQ_AK", "alice"), ("RMQ_SK", "not alice's key")];
    let r = c.run_env(Lang::Rust, &a, &["try-send", "secure"], &wrong);
    assert_eq!(r["outcome"], "UNAUTHORIZED", "{r}");
    let r = c.run(Lang::Rust, &a, &["try-send", "secure"]);
    assert_eq!(r["outcome"], "UNAUTHORIZED", "{r}");
    // Python refuses too (it reports a failed route, without the code).
    let r = c.run_env(Lang::Python, &a, &["try-send", "secure"], &wrong);
    assert_ne!(r["outcome"], "ok", "{r}");
    // Nothing of the refused sends was stored.
    let (ok, out, err) = halfmq_tests::cli_env(
        &a,
        &[
            "consume",
            "other",
            "--group",
            "x",
            "--timeout",
            "1s",
            "--json",
        ],
        &admin,
    );
    assert!(ok, "{err}");
    assert!(out.trim().is_empty(), "{out}");
    let (ok, out, err) = halfmq_tests::cli_env(
        &a,
        &[
            "consume",
            "secure",
            "--group",
            "x",
            "--timeout",
            "2s",
            "--json",
        ],
        &admin,
    );
    assert!(ok, "{err}");
    let mut stored: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["body"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    stored.sort();
    assert_eq!(stored, vec!["node-0", "py-0", "py-commit", "rust-0"]);
}
