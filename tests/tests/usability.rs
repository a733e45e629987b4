//! What a new user meets with the real binaries: start-up messages, error
//! texts, exit codes, a closed pipe, and the CLI's outputs and operator
//! commands end to end.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use halfmq_tests::{binary, BrokerProcess};
use serde_json::Value;

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Starts `halfmq-broker` with `RUST_LOG=info` and stderr into a file;
/// returns the process and the file's path.
fn broker_logging(dir: &Path, log: &Path, extra: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(binary("halfmq-broker"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (child, addr)
}

fn terminate(child: &mut std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn start_up_says_unclean_only_after_an_unclean_stop_and_logs_without_colour() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("broker.log");
    let unclean = "did not shut down cleanly";
    // A brand-new data dir, then a clean stop and start: never unclean.
    for _ in 0..2 {
        let (mut b, _) = broker_logging(&data, &log, &[]);
        terminate(&mut b);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("halfmq broker listening"), "{text}");
        assert!(!text.contains(unclean), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "no ANSI colour when stderr is not a terminal: {text:?}"
        );
    }
    // After kill -9 it is said.
    let (mut b, _) = broker_logging(&data, &log, &[]);
    b.kill().unwrap();
    b.wait().unwrap();
    let (mut b, _) = broker_logging(&data, &log, &[]);
    terminate(&mut b);
    assert!(std::fs::read_to_string(&log).unwrap().contains(unclean));
}

#[test]
fn a_second_broker_on_the_same_data_dir_is_told_who_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = BrokerProcess::start(dir.path(), &[]);
    let out = Command::new(binary("halfmq-broker"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "halfmq-broker: data dir {} is in use by another broker (pid {})\n",
        dir.path().display(),
        first.child.id()
    );
    assert_eq!(err, want);
    // The first is unharmed; once it is gone the directory opens.
    let (ok, _, e) = first.cli(&["topic", "list"]);
    assert!(ok, "{e}");
    first.kill9();
    let again = BrokerProcess::start(dir.path(), &[]);
    again.kill9();
}

#[test]
fn listen_takes_a_host_name_and_toml_takes_units() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(dir.path(), &["--listen", "localhost:0"]);
    let port = b.addr.rsplit_once(':').unwrap().1.to_owned();
    let out = Command::new(binary("halfmq"))
        .args(["--broker", &format!("localhost:{port}"), "topic", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.kill9();

    let toml = dir.path().join("units.toml");
    std::fs::write(
        &toml,
        "check_interval_ms = \"2s\"\nsegment_bytes = \"64MiB\"\nlisten = \"localhost:8081\"\n",
    )
    .unwrap();
    let out = Command::new(binary("halfmq-broker"))
        .args(["--print-config", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("check_interval_ms = 2000"), "{text}");
    assert!(text.contains("segment_bytes = 67108864"), "{text}");
    // Flags take sizes too.
    let out = Command::new(binary("halfmq-broker"))
        .args(["--print-config", "--max-message-bytes", "8MiB"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_message_bytes = 8388608"));
    // A bad value names its key, once.
    std::fs::write(&toml, "flush = \"sync\"\ncheck_interval_ms = \"soon\"\n").unwrap();
    let out = Command::new(binary("halfmq-broker"))
        .args(["--print-config", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`check_interval_ms`") && err.contains("line 2"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn consume_into_a_closed_pipe_exits_quietly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Received but unprinted messages come back as retries once their
    // invisible duration (1 s) passes: short delay levels.
    let b = BrokerProcess::start(dir.path(), &["--retry-delays", "100ms 100ms 100ms"]);
    let n = 200;
    let (ok, _, e) = b.cli(&["send", "pipe", "m", "--count", &n.to_string()]);
    assert!(ok, "{e}");
    let mut consume = Command::new(binary("halfmq"))
        .args(["--broker", &b.addr, "consume", "pipe", "--group", "g"])
        .args(["--invisible", "1s", "--timeout", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -1`: read one line, then close the pipe.
    let mut first = String::new();
    let mut stdout = BufReader::new(consume.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    drop(stdout);
    let out = consume.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "quiet: {err}");
    assert!(first.contains("pipe/"), "{first}");
    // What was printed is acked; everything else comes back.
    let stats = |b: &BrokerProcess| -> Value {
        let (ok, out, e) = b.cli(&["stats", "--json"]);
        assert!(ok, "{e}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let acked = stats(&b)["acks"].as_u64().unwrap();
    assert!(acked >= 1 && acked < n, "{acked}");
    let (ok, out, e) = b.cli(&[
        "consume",
        "pipe",
        "--group",
        "g",
        "--timeout",
        "3s",
        "--json",
    ]);
    assert!(ok, "{e}");
    let again = json_lines(&out);
    assert_eq!(
        again.len() as u64,
        n - acked,
        "every unprinted message returns"
    );
    b.kill9();
}

#[test]
fn bench_reports_failures_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(dir.path(), &["--max-message-bytes", "100"]);
    let out = Command::new(binary("halfmq-bench"))
        .args(["--broker", &b.addr, "--size", "1024", "--duration", "1s"])
        .args(["--warmup", "0s", "--drain-timeout", "1s", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("send failed") && err.contains("MessageTooLarge"),
        "{err}"
    );
    assert!(err.contains("messages failed"), "{err}");
    assert!(
        err.matches("send failed").count() <= 5,
        "only the first errors: {err}"
    );
    // The figures still come out, saying how many failed.
    let summary: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert!(summary["errors"].as_u64().unwrap() > 0);
    b.kill9();
}

#[test]
fn cli_outputs_a_person_reads() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(
        dir.path(),
        &[
            "--retry-delays",
            "200ms 300ms 400ms",
            "--max-reconsume-times",
            "1",
        ],
    );
    let cli = |args: &[&str]| b.cli(args);
    let (ok, _, e) = cli(&["topic", "create", "ux", "--queues", "1"]);
    assert!(ok, "{e}");
    // A delayed send's receipt has no queue offset (it gets one when due).
    let (ok, out, e) = cli(&["send", "ux", "later", "--delay", "1h", "--json"]);
    assert!(ok, "{e}");
    let r = &json_lines(&out)[0];
    assert!(r.get("queue_offset").is_none(), "{r}");
    assert!(r["deliver_at_ms"].as_u64().unwrap() > 0, "{r}");
    let (ok, out, _) = cli(&["send", "ux", "now", "--json"]);
    assert!(ok);
    assert_eq!(json_lines(&out)[0]["queue_offset"], 0);
    // Text output: one line per message, newlines escaped, binary marked.
    let (ok, _, e) = cli(&["send", "ux", "two\nlines"]);
    assert!(ok, "{e}");
    let binary_body = Command::new(binary("halfmq"))
        .args(["--broker", &b.addr, "send", "ux"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&[0xff, 0xfe, 0x00])?;
            c.wait()
        })
        .unwrap();
    assert!(binary_body.success());
    let (ok, out, e) = cli(&[
        "consume",
        "ux",
        "--group",
        "text",
        "--count",
        "3",
        "--timeout",
        "2s",
    ]);
    assert!(ok, "{e}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].ends_with("ux/0@0 body=\"now\""), "{out}");
    assert!(lines[1].ends_with("body=\"two\\nlines\""), "{out}");
    assert!(lines[2].ends_with("body(base64)=//4A"), "{out}");
    // An invisible duration past max_invisible_duration_ms is refused.
    let (ok, _, e) = cli(&["consume", "ux", "--group", "x", "--invisible", "13h"]);
    assert!(!ok && e.contains("max_invisible_duration_ms"), "{e}");

    // A retry shows where the message was; the DLQ keeps its body.
    let (ok, _, e) = cli(&["send", "ux-dlq", "bad"]);
    assert!(ok, "{e}");
    let (ok, out, e) = cli(&[
        "consume",
        "ux-dlq",
        "--group",
        "billing",
        "--nack",
        "--reason",
        "cannot parse",
        "--timeout",
        "2s",
        "--json",
    ]);
    assert!(ok, "{e}");
    let got = json_lines(&out);
    let bad: Vec<&Value> = got.iter().filter(|m| m["body"] == "bad").collect();
    assert_eq!(
        bad.len(),
        2,
        "delivered max_reconsume_times + 1 = 2 times: {out}"
    );
    assert_eq!(bad[0]["retry"], false);
    assert_eq!(bad[1]["retry"], true);
    assert_eq!(
        bad[1]["original_queue_offset"], bad[0]["queue_offset"],
        "{out}"
    );
    let (ok, out, e) = cli(&["dlq", "list", "billing", "--json"]);
    assert!(ok, "{e}");
    let dead = json_lines(&out);
    let d = dead
        .iter()
        .find(|d| d["body"] == "bad")
        .expect("bad is dead");
    assert_eq!(d["reason"], "cannot parse");
    assert_eq!(d["body_encoding"], "utf8");
    assert_eq!(d["queue_offset"], bad[0]["queue_offset"]);
    let id = d["message_id"].as_str().unwrap();
    let (ok, out, e) = cli(&["dlq", "show", "billing", id]);
    assert!(ok, "{e}");
    assert!(
        out.contains("body=\"bad\"") && out.contains("cannot parse"),
        "{out}"
    );
    let (ok, _, e) = cli(&["dlq", "show", "billing", &"0".repeat(32)]);
    assert!(!ok && e.contains("no dead letter"), "{e}");

    // stats is a table; group list sums per group.
    let (ok, out, e) = cli(&["stats"]);
    assert!(ok, "{e}");
    assert!(!out.trim_start().starts_with('{'), "{out}");
    assert!(
        out.contains("messages_in") && out.contains("since start"),
        "{out}"
    );
    let (ok, out, e) = cli(&["group", "list", "--json"]);
    assert!(ok, "{e}");
    let groups = json_lines(&out);
    let billing = groups.iter().find(|g| g["group"] == "billing").unwrap();
    assert_eq!(billing["topics"], serde_json::json!(["ux-dlq"]), "{out}");
    assert_eq!(billing["dead_letters"], 1);
    assert!(billing.get("lag").is_some() && billing.get("inflight").is_some());
    b.kill9();
}

#[test]
fn group_reset_offset_earliest_latest_and_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(dir.path(), &[]);
    let cli = |args: &[&str]| b.cli(args);
    assert!(cli(&["topic", "create", "rs", "--queues", "2"]).0);
    let (ok, _, e) = cli(&["send", "rs", "old", "--count", "4"]);
    assert!(ok, "{e}");
    std::thread::sleep(Duration::from_millis(50));
    let cut = halfmq_storage::now_ms();
    std::thread::sleep(Duration::from_millis(50));
    let (ok, _, e) = cli(&["send", "rs", "new", "--count", "2"]);
    assert!(ok, "{e}");
    let consume = |group: &str| -> Vec<String> {
        let (ok, out, e) = b.cli(&[
            "consume",
            "rs",
            "--group",
            group,
            "--timeout",
            "1s",
            "--json",
        ]);
        assert!(ok, "{e}");
        json_lines(&out)
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(consume("g").len(), 6);
    assert!(consume("g").is_empty());
    let (ok, out, e) = cli(&["group", "reset-offset", "g", "rs", "--to", "earliest"]);
    assert!(ok, "{e}");
    assert!(
        out.contains("queue 0 at 0") && out.contains("queue 1 at 0"),
        "{out}"
    );
    assert_eq!(consume("g").len(), 6, "all again");
    let (ok, out, e) = cli(&[
        "group",
        "reset-offset",
        "g",
        "rs",
        "--to",
        &cut.to_string(),
        "--json",
    ]);
    assert!(ok, "{e}");
    let offsets = json_lines(&out);
    assert_eq!(offsets.len(), 2);
    let mut bodies = consume("g");
    bodies.sort();
    assert_eq!(bodies, ["new", "new"], "only what was stored after the cut");
    // A new group can start at the end.
    let (ok, _, e) = cli(&["group", "reset-offset", "fresh", "rs", "--to", "latest"]);
    assert!(ok, "{e}");
    assert!(consume("fresh").is_empty());
    let (ok, _, e) = cli(&["send", "rs", "after"]);
    assert!(ok, "{e}");
    assert_eq!(consume("fresh"), ["after"]);
    // RFC 3339 is taken too; nonsense and unknown topics are refused.
    let (ok, _, e) = cli(&[
        "group",
        "reset-offset",
        "g",
        "rs",
        "--to",
        "2026-01-01T00:00:00Z",
    ]);
    assert!(ok, "{e}");
    let (ok, _, e) = cli(&["group", "reset-offset", "g", "rs", "--to", "yesterday"]);
    assert!(!ok && e.contains("earliest, latest"), "{e}");
    let (ok, _, e) = cli(&["group", "reset-offset", "g", "nope", "--to", "earliest"]);
    assert!(!ok && e.contains("does not exist"), "{e}");
    // Survives a restart.
    assert!(cli(&["group", "reset-offset", "g", "rs", "--to", "earliest"]).0);
    b.kill9();
    let b = BrokerProcess::start(dir.path(), &[]);
    let (ok, out, e) = b.cli(&["consume", "rs", "--group", "g", "--timeout", "1s"]);
    assert!(ok, "{e}");
    assert_eq!(out.lines().count(), 7, "{out}");
    b.kill9();
}

#[test]
fn topic_delete_refuses_pending_halves_and_stays_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(dir.path(), &[]);
    let cli = |args: &[&str]| b.cli(args);
    assert!(cli(&["topic", "create", "gone", "--queues", "2"]).0);
    assert!(cli(&["send", "gone", "m", "--count", "5"]).0);
    let (ok, out, _) = cli(&["consume", "gone", "--group", "g", "--count", "2", "--json"]);
    assert!(ok && json_lines(&out).len() == 2);
    let (ok, out, e) = cli(&[
        "tx", "send", "gone", "half", "--group", "pg", "--local", "exit", "--json",
    ]);
    assert!(ok, "{e}");
    let tx = json_lines(&out)[0]["transaction_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, _, e) = cli(&["topic", "delete", "gone"]);
    assert!(
        !ok && e.contains("TopicBusy") && e.contains("1 pending half"),
        "{e}"
    );
    let (ok, _, e) = cli(&["send", "gone", "d", "--delay", "1h"]);
    assert!(ok, "{e}");
    assert!(cli(&["tx", "end", &tx, "--rollback"]).0);
    let (ok, _, e) = cli(&["topic", "delete", "gone"]);
    assert!(!ok && e.contains("1 delayed message"), "{e}");
    b.kill9();

    // Without the delayed message (a fresh directory), deletion goes through.
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(dir.path(), &[]);
    let cli = |args: &[&str]| b.cli(args);
    assert!(cli(&["topic", "create", "gone", "--queues", "2"]).0);
    assert!(cli(&["send", "gone", "old", "--count", "5"]).0);
    let (ok, out, _) = cli(&["consume", "gone", "--group", "g", "--count", "2", "--json"]);
    assert!(ok && json_lines(&out).len() == 2);
    let (ok, out, e) = cli(&["topic", "delete", "gone"]);
    assert!(ok, "{e}");
    assert_eq!(out.trim(), "deleted topic gone");
    let (ok, out, _) = cli(&["topic", "list", "--json"]);
    assert!(ok && !out.contains("\"gone\""), "{out}");
    let (ok, out, _) = cli(&["group", "list", "--json"]);
    assert!(ok && !out.contains("\"gone\""), "{out}");
    let (ok, _, e) = cli(&["topic", "delete", "gone"]);
    assert!(!ok && e.contains("does not exist"), "{e}");
    // Killed right after: not resurrected from its consume queues or log.
    b.kill9();
    let b = BrokerProcess::start(dir.path(), &[]);
    let (ok, out, _) = b.cli(&["topic", "list", "--json"]);
    assert!(ok && !out.contains("\"gone\""), "{out}");
    // Used again, it starts afresh: offsets from 0, the old group sees only
    // the new messages.
    let (ok, out, e) = b.cli(&["send", "gone", "new", "--json"]);
    assert!(ok, "{e}");
    assert_eq!(json_lines(&out)[0]["queue_offset"], 0);
    let (ok, out, e) = b.cli(&[
        "consume",
        "gone",
        "--group",
        "g",
        "--timeout",
        "1s",
        "--json",
    ]);
    assert!(ok, "{e}");
    let bodies: HashSet<String> = json_lines(&out)
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies, HashSet::from(["new".to_owned()]));
    b.kill9();
}

#[test]
fn tx_pending_notes_every_half() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(
        dir.path(),
        &["--transaction-timeout", "1s", "--check-interval", "30s"],
    );
    let (ok, _, e) = b.cli(&[
        "tx", "send", "notes", "young", "--group", "pg", "--local", "exit",
    ]);
    assert!(ok, "{e}");
    let note = |b: &BrokerProcess| -> String {
        let (ok, out, e) = b.cli(&["tx", "pending", "--json"]);
        assert!(ok, "{e}");
        json_lines(&out)[0]["note"].as_str().unwrap().to_owned()
    };
    let n = note(&b);
    assert!(
        n.contains("younger than transaction_timeout") && n.contains("first check at"),
        "{n}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = note(&b);
        if n.contains("no live session of producer group pg") {
            break;
        }
        assert!(Instant::now() < deadline, "{n}");
        std::thread::sleep(Duration::from_millis(200));
    }
    b.kill9();
}
