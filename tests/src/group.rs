//! A broker group of three processes for the black-box tests: start, stop,
//! find the leader.

use std::time::{Duration, Instant};

use halfmq_client::{Client, ClientOptions, Cluster};

use crate::{free_port, BrokerProcess};

/// Three `halfmq-broker` processes forming a broker group on 127.0.0.1.
#[derive(Debug)]
pub struct Group {
    /// The members (`None` while stopped). Dropped first: the processes
    /// stop before their directories go.
    pub procs: Vec<Option<BrokerProcess>>,
    /// Their data directories.
    pub dirs: Vec<tempfile::TempDir>,
    /// Their client addresses.
    pub addrs: Vec<String>,
    /// `--peers` of the group.
    pub peers: String,
    /// More flags for every member.
    pub extra: Vec<String>,
    /// Environment variables of every member.
    pub env: Vec<(String, String)>,
}

impl Group {
    /// Three members on free ports, each in its own temporary directory,
    /// started.
    pub fn start_all() -> Group {
        Group::start_all_with(&[])
    }

    /// [`Group::start_all`] with more flags for every member (a flag given
    /// replaces the default's value).
    pub fn start_all_with(extra: &[&str]) -> Group {
        Group::start_all_env(extra, &[])
    }

    /// [`Group::start_all_with`] with environment variables for every member.
    pub fn start_all_env(extra: &[&str], env: &[(&str, &str)]) -> Group {
        let addrs: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut g = Group {
            procs: vec![None, None, None],
            dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
            addrs,
            peers,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for i in 0..3 {
            g.start(i);
        }
        g
    }

    /// The flags of member `i`.
    pub fn flags(&self, i: usize) -> Vec<String> {
        [
            "--listen",
            &self.addrs[i],
            "--node-id",
            &(i + 1).to_string(),
            "--peers",
            &self.peers,
            "--raft-heartbeat-interval",
            "50ms",
            "--raft-election-timeout-min",
            "300ms",
            "--raft-election-timeout-max",
            "600ms",
            "--checkpoint-interval",
            "200ms",
            "--transaction-timeout",
            "300ms",
            "--check-interval",
            "300ms",
            "--check-reply-timeout",
            "500ms",
            "--check-max",
            "1000",
            "--retry-delays",
            "100ms 200ms",
            "--max-reconsume-times",
            "2",
        ]
        .chunks(2)
        // A flag given in `extra` replaces the default.
        .filter(|kv| !self.extra.iter().any(|e| e == kv[0]))
        .flatten()
        .map(|s| s.to_string())
        .chain(self.extra.iter().cloned())
        .collect()
    }

    /// Starts member `i`.
    ///
    /// # Panics
    /// When it does not start.
    pub fn start(&mut self, i: usize) {
        let flags = self.flags(i);
        let f: Vec<&str> = flags.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.procs[i] = Some(BrokerProcess::start_env(self.dirs[i].path(), &f, &env));
    }
}

/// Client options of these tests: short requests, long enough to fail over.
pub fn opts() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(3),
        failover_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

/// The group as the members at `addrs` see it.
pub fn status_of(rt: &tokio::runtime::Runtime, addrs: &str) -> Vec<halfmq_client::NodeStatus> {
    status_with(rt, addrs, opts())
}

/// [`status_of`], asked with `o` (credentials, TLS).
///
/// # Panics
/// For an unusable address.
pub fn status_with(
    rt: &tokio::runtime::Runtime,
    addrs: &str,
    o: ClientOptions,
) -> Vec<halfmq_client::NodeStatus> {
    rt.block_on(async {
        let c = Cluster::new(Client::connect_with(addrs, o).await.unwrap());
        c.status().await.0
    })
}

/// The leader's index (node id - 1), waiting up to 20 s for one.
///
/// # Panics
/// When there is none by then.
pub fn leader_of(rt: &tokio::runtime::Runtime, addrs: &str) -> usize {
    leader_with(rt, addrs, opts())
}

/// [`leader_of`], asked with `o`.
///
/// # Panics
/// As [`leader_of`].
pub fn leader_with(rt: &tokio::runtime::Runtime, addrs: &str, o: ClientOptions) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(n) = status_with(rt, addrs, o.clone())
            .iter()
            .find(|n| n.role == "leader")
        {
            return n.node_id as usize - 1;
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(50));
    }
}
