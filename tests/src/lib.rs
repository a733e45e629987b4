//! Helpers for halfmq's black-box integration tests (under `tests/tests/`):
//! an in-process broker on an ephemeral port, and the real binaries.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use halfmq_broker::{BrokerConfig, RunningBroker};

pub mod certs;
pub mod group;

/// A configuration for tests: ephemeral port, data in `dir`, small segments.
pub fn test_config(dir: &Path) -> BrokerConfig {
    BrokerConfig {
        listen: "127.0.0.1:0".into(),
        // Tests run brokers side by side: each its own HTTP port.
        http_listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        segment_bytes: 8 << 20,
        max_message_bytes: 64 * 1024,
        checkpoint_interval_ms: 200,
        retry_delays: "100ms 200ms 300ms".into(),
        min_free_disk_bytes: 1 << 20,
        ..BrokerConfig::default()
    }
}

/// A two-thread tokio runtime, for tests that also drive child processes
/// from plain threads.
///
/// # Panics
/// When the runtime cannot be built.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Starts an in-process broker.
///
/// # Panics
/// When the broker cannot start (a test failure).
pub async fn start(cfg: BrokerConfig) -> RunningBroker {
    halfmq_broker::start(cfg).await.expect("start broker")
}

/// The path of a workspace binary (`halfmq-broker`, `halfmq`,
/// `halfmq-bench`), built by
/// `cargo test --workspace`; built on demand when missing.
///
/// # Panics
/// When it cannot be found or built.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let package = match name {
            "halfmq" => "halfmq-client",
            "halfmq-bench" => "halfmq-bench",
            _ => "halfmq-broker",
        };
        let status = Command::new(cargo)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    path
}

/// A `halfmq-broker` child process.
#[derive(Debug)]
pub struct BrokerProcess {
    /// The child.
    pub child: Child,
    /// Address it listens on.
    pub addr: String,
}

impl BrokerProcess {
    /// Starts `halfmq-broker --listen 127.0.0.1:0 --data-dir DIR` plus `extra`
    /// flags (a `--listen` in `extra` replaces the default) and waits for its
    /// "listening on" line.
    ///
    /// # Panics
    /// When it does not start within 20 s.
    pub fn start(dir: &Path, extra: &[&str]) -> BrokerProcess {
        BrokerProcess::start_env(dir, extra, &[])
    }

    /// [`BrokerProcess::start`] with environment variables `env`.
    ///
    /// # Panics
    /// As [`BrokerProcess::start`].
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> BrokerProcess {
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        // Brokers run side by side: each its own HTTP port.
        let http: &[&str] = if extra.contains(&"--http-listen") {
            &[]
        } else {
            &["--http-listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(binary("halfmq-broker"))
            .args(listen)
            .args(http)
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn halfmq-broker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("broker printed its address");
        BrokerProcess { child, addr }
    }

    /// Runs the `halfmq` CLI against this broker with `args`; returns
    /// (exit success, stdout, stderr).
    ///
    /// # Panics
    /// When the CLI cannot be run.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli(&self.addr, args)
    }

    /// SIGKILL, and reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit; returns the exit status.
    ///
    /// # Panics
    /// When `kill` cannot be run.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        self.child.wait().expect("wait broker")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cuts the commit log of a stopped broker in `dir` back to log offset
/// `end`, as if its tail were lost (segments wholly below `end` are left
/// alone). Returns the bytes cut.
///
/// # Panics
/// On I/O errors.
pub fn cut_commit_log(dir: &Path, end: u64) -> u64 {
    let mut cut = 0;
    for e in std::fs::read_dir(dir.join("commitlog")).expect("read commitlog/") {
        let path = e.expect("commitlog entry").path();
        let Some(base) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let len = std::fs::metadata(&path).expect("segment metadata").len();
        if base + len <= end {
            continue;
        }
        let keep = end.saturating_sub(base);
        cut += len - keep;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open segment");
        f.set_len(keep).expect("cut segment");
        f.sync_all().expect("sync segment");
    }
    cut
}

/// A tmpfs mounted on a temporary directory (needs root); unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"6m"`); `None` when mounting is refused.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Grows (or shrinks) it to `size`.
    ///
    /// # Panics
    /// When the remount fails.
    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(ok.success(), "remount");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Messages stored on `topic` (summed over its queues; 0 for no topic).
///
/// # Panics
/// When the topic list cannot be fetched (a test failure).
pub async fn stored(admin: &halfmq_client::Admin, topic: &str) -> u64 {
    admin
        .list_topics()
        .await
        .expect("list topics")
        .iter()
        .find(|t| t.name == topic)
        .map_or(0, |t| t.messages)
}

/// Runs the `halfmq` CLI with `--broker brokers` and `args`; returns (exit
/// success, stdout, stderr).
///
/// # Panics
/// When the CLI cannot be run.
pub fn cli(brokers: &str, args: &[&str]) -> (bool, String, String) {
    cli_env(brokers, args, &[])
}

/// [`cli`] with environment variables `env` (e.g. `HALFMQ_SECRET`).
///
/// # Panics
/// When the CLI cannot be run.
pub fn cli_env(brokers: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(binary("halfmq"))
        .args(["--broker", brokers])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run halfmq");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A port free on 127.0.0.1 now (another process may take it before use).
///
/// # Panics
/// When no port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// The decision table of the crash tests' transactions: body `tx-<n>` is
/// committed for even n, rolled back for odd; `None` for other bodies.
pub fn decision(body: &str) -> Option<bool> {
    body.strip_prefix("tx-")
        .and_then(|n| n.parse::<u64>().ok())
        .map(|n| n.is_multiple_of(2))
}

/// A checker answering check-backs from [`decision`].
pub fn table_checker(
    m: halfmq_client::MessageView,
) -> std::future::Ready<halfmq_client::TransactionResolution> {
    use halfmq_client::TransactionResolution as R;
    std::future::ready(match decision(&String::from_utf8_lossy(&m.body)) {
        Some(true) => R::Commit,
        Some(false) => R::Rollback,
        None => R::Unknown,
    })
}

/// A plain HTTP/1.1 request to the broker's HTTP endpoint, for the tests of
/// `/metrics` and the console: `headers` are added as given (`Name: value`
/// lines), `body` sent with its length. Returns (status, response head
/// with lower-case header names as axum sends them, body).
///
/// # Panics
/// When the endpoint cannot be reached or does not answer within 10 s.
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[String],
    body: &str,
) -> (u16, String, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // The bodies here are small: axum sends them with a length, not chunked.
    (status, head.to_owned(), rest.to_owned())
}
