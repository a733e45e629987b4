//! `halfmq-broker`: runs the broker. With no arguments: data in
//! `./halfmq-data`, listening on `127.0.0.1:8081`, sync flush. `--config FILE`
//! reads TOML; every flag overrides its key. Invalid configuration exits 2.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use halfmq_broker::{BrokerConfig, FlushSetting};

/// mimalloc instead of glibc malloc: the broker allocates per request on
/// several threads, and glibc's arena locks and slow paths cost about a tenth
/// of its CPU under load (profiled with `halfmq-bench --mode tx`). Built with
/// `no_thp`: with transparent huge pages on, its arenas made an idle broker
/// 48 MB resident instead of 8 MB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use halfmq_broker::units::{
    parse_bytes, parse_duration_ms as duration_ms, parse_duration_us as duration_us,
};

/// halfmq broker. Flags override the TOML file's keys; durations take units
/// (500ms, 30s, 72h). Every key is documented in README.md.
#[derive(Debug, Parser)]
#[command(name = "halfmq-broker", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// `listen`: address to listen on.
    #[arg(long)]
    listen: Option<String>,
    /// `data_dir`: data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `flush`: sync or async.
    #[arg(long, value_parser = ["sync", "async"])]
    flush: Option<String>,
    /// `flush_interval_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    flush_interval: Option<u64>,
    /// `segment_bytes`.
    #[arg(long, value_parser = parse_bytes)]
    segment_bytes: Option<u64>,
    /// `max_message_bytes`.
    #[arg(long, value_parser = parse_bytes)]
    max_message_bytes: Option<u64>,
    /// `max_batch_messages`.
    #[arg(long)]
    max_batch_messages: Option<u32>,
    /// `max_batch_bytes`.
    #[arg(long, value_parser = parse_bytes)]
    max_batch_bytes: Option<u64>,
    /// `auto_create_topics`: true or false.
    #[arg(long)]
    auto_create_topics: Option<bool>,
    /// `http_listen`: the HTTP endpoint (/metrics, /healthz, /readyz), HOST:PORT; "" = off.
    #[arg(long)]
    http_listen: Option<String>,
    /// `metrics_anonymous`: with auth on, serve /metrics without credentials.
    #[arg(long)]
    metrics_anonymous: Option<bool>,
    /// `console_session_ttl_ms`: how long a web console login lasts (ms, or 8h).
    #[arg(long, value_parser = duration_ms)]
    console_session_ttl: Option<u64>,
    /// `console_max_sessions`: most web console sessions at once.
    #[arg(long)]
    console_max_sessions: Option<u32>,
    /// `rocketmq_enabled`: serve RocketMQ 5's gRPC API too, true or false.
    #[arg(long)]
    rocketmq_enabled: Option<bool>,
    /// `rocketmq_max_clients`.
    #[arg(long)]
    rocketmq_max_clients: Option<u32>,
    /// `default_queues`.
    #[arg(long)]
    default_queues: Option<u32>,
    /// `max_queues`.
    #[arg(long)]
    max_queues: Option<u32>,
    /// `max_topics`.
    #[arg(long)]
    max_topics: Option<u32>,
    /// `default_invisible_duration_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    default_invisible_duration: Option<u64>,
    /// `max_invisible_duration_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    max_invisible_duration: Option<u64>,
    /// `max_receive_messages`.
    #[arg(long)]
    max_receive_messages: Option<u32>,
    /// `max_receive_bytes`: most record bytes one receive returns.
    #[arg(long, value_parser = parse_bytes)]
    max_receive_bytes: Option<u64>,
    /// `max_lease_total_ms`, as a duration: longest a delivery stays leased in all.
    #[arg(long, value_parser = duration_ms)]
    max_lease_total: Option<u64>,
    /// `max_long_polls`: long polls at once, broker-wide.
    #[arg(long)]
    max_long_polls: Option<u32>,
    /// `max_producer_sessions`: producer sessions at once, broker-wide.
    #[arg(long)]
    max_producer_sessions: Option<u32>,
    /// `max_consumer_groups`: (consumer group, topic) pairs with progress.
    #[arg(long)]
    max_consumer_groups: Option<u32>,
    /// `handshake_timeout_ms`, as a duration: time to send the HTTP/2 preface.
    #[arg(long, value_parser = duration_ms)]
    handshake_timeout: Option<u64>,
    /// `max_handshaking_connections`: connections not past the preface yet.
    #[arg(long)]
    max_handshaking_connections: Option<u32>,
    /// `idle_timeout_ms`, as a duration: a silent connection is closed.
    #[arg(long, value_parser = duration_ms)]
    idle_timeout: Option<u64>,
    /// `max_receive_wait_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    max_receive_wait: Option<u64>,
    /// `max_inflight_per_queue`.
    #[arg(long)]
    max_inflight_per_queue: Option<u32>,
    /// `max_unacked_window`.
    #[arg(long)]
    max_unacked_window: Option<u64>,
    /// `max_connections`.
    #[arg(long)]
    max_connections: Option<u32>,
    /// `worker_threads` (0 = one per CPU core).
    #[arg(long)]
    worker_threads: Option<u32>,
    /// `max_requests_per_connection`.
    #[arg(long)]
    max_requests_per_connection: Option<u32>,
    /// `checkpoint_interval_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    checkpoint_interval: Option<u64>,
    /// `retention_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    retention: Option<u64>,
    /// `retention_bytes` (0 = no size budget).
    #[arg(long, value_parser = parse_bytes)]
    retention_bytes: Option<u64>,
    /// `retention_check_interval_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    retention_check_interval: Option<u64>,
    /// `transaction_replay_bytes`: log a restart may replay for the transaction state.
    #[arg(long, value_parser = parse_bytes)]
    transaction_replay_bytes: Option<u64>,
    /// `max_delay_ms`, as a duration: longest delay of a delayed send.
    #[arg(long, value_parser = duration_ms)]
    max_delay: Option<u64>,
    /// `min_free_disk_bytes`: writes are refused (STORAGE_FULL) below this much free disk; 0 = no floor.
    #[arg(long, value_parser = parse_bytes)]
    min_free_disk_bytes: Option<u64>,
    /// `preallocate_bytes`: zero-filled space kept ahead of the commit log's end; 0 = off.
    #[arg(long, value_parser = parse_bytes)]
    preallocate_bytes: Option<u64>,
    /// `read_cache_bytes`: recent commit-log bytes kept in memory for reads; 0 = off.
    #[arg(long, value_parser = parse_bytes)]
    read_cache_bytes: Option<u64>,
    /// `sync_wait_spin_us`, as a duration (200us): with sync flush, how long
    /// a request polls for its fdatasync before it sleeps; 0 = off.
    #[arg(long, value_parser = duration_us)]
    sync_wait_spin: Option<u64>,
    /// `transaction_timeout_ms`, as a duration: halves younger than this are
    /// never checked back.
    #[arg(long, value_parser = duration_ms)]
    transaction_timeout: Option<u64>,
    /// `check_interval_ms`, as a duration: wait between two checks of a half.
    #[arg(long, value_parser = duration_ms)]
    check_interval: Option<u64>,
    /// `check_max`: checks delivered before a half is given up.
    #[arg(long)]
    check_max: Option<u32>,
    /// `check_reply_timeout_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    check_reply_timeout: Option<u64>,
    /// `max_checks_inflight_per_session`.
    #[arg(long)]
    max_checks_inflight_per_session: Option<u32>,
    /// `max_pending_halves`.
    #[arg(long)]
    max_pending_halves: Option<u64>,
    /// `dedup_window_ms`, as a duration: how long idempotency keys are
    /// remembered.
    #[arg(long, value_parser = duration_ms)]
    dedup_window: Option<u64>,
    /// `max_dedup_keys`: most idempotency keys remembered.
    #[arg(long)]
    max_dedup_keys: Option<u64>,
    /// `retry_delays`: delay levels, e.g. "1s 5s 10s 30s 1m".
    #[arg(long)]
    retry_delays: Option<String>,
    /// `max_reconsume_times`: failed deliveries before the DLQ.
    #[arg(long)]
    max_reconsume_times: Option<u32>,
    /// `node_id`: this broker's id in its broker group (with --peers).
    #[arg(long)]
    node_id: Option<u64>,
    /// `peers`: the broker group, "1=127.0.0.1:8081,2=127.0.0.1:8091,..."
    /// (each member's client address, this one's included).
    #[arg(long)]
    peers: Option<String>,
    /// `join`: this member joins a broker group that exists already (it
    /// waits to be added with `halfmq cluster add-learner`); `--join` alone
    /// means true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    join: Option<bool>,
    /// `raft_heartbeat_interval_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    raft_heartbeat_interval: Option<u64>,
    /// `raft_election_timeout_min_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    raft_election_timeout_min: Option<u64>,
    /// `raft_election_timeout_max_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    raft_election_timeout_max: Option<u64>,
    /// `raft_max_payload_entries`: entries per AppendEntries.
    #[arg(long)]
    raft_max_payload_entries: Option<u64>,
    /// `raft_snapshot_chunk_bytes`.
    #[arg(long, value_parser = parse_bytes)]
    raft_snapshot_chunk_bytes: Option<u64>,
    /// `raft_max_snapshot_bytes`.
    #[arg(long, value_parser = parse_bytes)]
    raft_max_snapshot_bytes: Option<u64>,
    /// `raft_install_snapshot_timeout_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    raft_install_snapshot_timeout: Option<u64>,
    /// `raft_connect_timeout_ms`, as a duration.
    #[arg(long, value_parser = duration_ms)]
    raft_connect_timeout: Option<u64>,
    /// Require signed requests and apply users' policies ([auth] enabled).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    auth: Option<bool>,
    /// With auth off, listen on a non-loopback address anyway ([auth] allow_anonymous).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    allow_anonymous: Option<bool>,
    /// Window of a signed request's time, either way ([auth] max_request_age_ms).
    #[arg(long, value_parser = duration_ms)]
    max_request_age: Option<u64>,
    /// PEM certificate chain: the listener speaks TLS ([tls] cert).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert ([tls] key).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed ([tls] client_ca).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// PEM CA of the other members' certificates ([tls] peer_ca).
    #[arg(long)]
    tls_peer_ca: Option<PathBuf>,
}

macro_rules! apply {
    ($cfg:ident, $args:ident, $($flag:ident => $($key:ident).+),* $(,)?) => {
        $( if let Some(v) = $args.$flag.clone() { $cfg.$($key).+ = v; } )*
    };
}

fn load_config(args: &Args) -> anyhow::Result<BrokerConfig> {
    let mut cfg = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            BrokerConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => BrokerConfig::default(),
    };
    apply!(cfg, args,
        listen => listen, data_dir => data_dir, flush_interval => flush_interval_ms,
        segment_bytes => segment_bytes, max_message_bytes => max_message_bytes,
        max_batch_messages => max_batch_messages, max_batch_bytes => max_batch_bytes,
        auto_create_topics => auto_create_topics, default_queues => default_queues,
        rocketmq_enabled => rocketmq_enabled, rocketmq_max_clients => rocketmq_max_clients,
        http_listen => http_listen, metrics_anonymous => metrics_anonymous,
        console_session_ttl => console_session_ttl_ms, console_max_sessions => console_max_sessions,
        max_queues => max_queues, max_topics => max_topics,
        default_invisible_duration => default_invisible_duration_ms,
        max_invisible_duration => max_invisible_duration_ms,
        max_receive_messages => max_receive_messages, max_receive_wait => max_receive_wait_ms,
        max_receive_bytes => max_receive_bytes, max_lease_total => max_lease_total_ms,
        max_long_polls => max_long_polls, max_producer_sessions => max_producer_sessions,
        max_consumer_groups => max_consumer_groups, handshake_timeout => handshake_timeout_ms,
        max_handshaking_connections => max_handshaking_connections, idle_timeout => idle_timeout_ms,
        max_inflight_per_queue => max_inflight_per_queue, max_unacked_window => max_unacked_window,
        max_connections => max_connections, max_requests_per_connection => max_requests_per_connection,
        worker_threads => worker_threads,
        checkpoint_interval => checkpoint_interval_ms, retention => retention_ms,
        retention_bytes => retention_bytes, retention_check_interval => retention_check_interval_ms,
        min_free_disk_bytes => min_free_disk_bytes, preallocate_bytes => preallocate_bytes,
        read_cache_bytes => read_cache_bytes, sync_wait_spin => sync_wait_spin_us,
        max_delay => max_delay_ms,
        transaction_replay_bytes => transaction_replay_bytes,
        transaction_timeout => transaction_timeout_ms, check_interval => check_interval_ms,
        check_max => check_max, check_reply_timeout => check_reply_timeout_ms,
        max_checks_inflight_per_session => max_checks_inflight_per_session,
        max_pending_halves => max_pending_halves,
        dedup_window => dedup_window_ms, max_dedup_keys => max_dedup_keys,
        retry_delays => retry_delays, max_reconsume_times => max_reconsume_times,
        node_id => node_id, peers => peers, join => join,
        raft_heartbeat_interval => raft_heartbeat_interval_ms,
        raft_election_timeout_min => raft_election_timeout_min_ms,
        raft_election_timeout_max => raft_election_timeout_max_ms,
        raft_max_payload_entries => raft_max_payload_entries,
        raft_snapshot_chunk_bytes => raft_snapshot_chunk_bytes,
        raft_max_snapshot_bytes => raft_max_snapshot_bytes,
        raft_install_snapshot_timeout => raft_install_snapshot_timeout_ms,
        raft_connect_timeout => raft_connect_timeout_ms,
    );
    apply!(cfg, args,
        max_request_age => auth.max_request_age_ms,
        tls_cert => tls.cert, tls_key => tls.key, tls_client_ca => tls.client_ca,
        tls_peer_ca => tls.peer_ca,
    );
    if let Some(v) = args.auth {
        cfg.auth.enabled = v;
    }
    if let Some(v) = args.allow_anonymous {
        cfg.auth.allow_anonymous = v;
    }
    // Secrets come from the environment only: never a flag (visible in
    // `ps`) or the config file.
    let secret = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|s| !s.is_empty())
            .map(halfmq_broker::auth::config::SecretString::new)
    };
    cfg.auth.admin_secret = secret("HALFMQ_ADMIN_SECRET");
    cfg.auth.cluster_secret = secret("HALFMQ_CLUSTER_SECRET");
    if let Some(f) = &args.flush {
        cfg.flush = if f == "async" {
            FlushSetting::Async
        } else {
            FlushSetting::Sync
        };
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Installs the SIGINT and SIGTERM handlers at once (so a signal during
/// start-up, recovery included, is not the default "terminate now") and
/// returns the future that completes on the first of them.
///
/// # Errors
/// When a handler cannot be installed.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

fn main() -> std::process::ExitCode {
    // openraft warns on every missed heartbeat to a peer that is down (ten a
    // second); its errors still show.
    halfmq_broker::logging::init("info,openraft=error");
    let args = Args::parse();
    let cfg = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "halfmq-broker: {}",
                halfmq_broker::logging::report(e.as_ref())
            );
            return std::process::ExitCode::from(2);
        }
    };
    if args.print_config {
        match toml::to_string(&cfg) {
            Ok(t) => {
                print!("{t}");
                return std::process::ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("halfmq-broker: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let rt = match halfmq_broker::server::runtime_builder(cfg.worker_threads as usize)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("halfmq-broker: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res: anyhow::Result<()> = rt.block_on(async move {
        let stop = shutdown_signal().context("installing the SIGINT/SIGTERM handlers")?;
        let listener =
            halfmq_broker::server::bind(&cfg).with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        // Bound before the store opens: a bad http_listen fails at once, and
        // every port is taken before "listening on" is printed.
        let http = halfmq_broker::http::bind(&cfg.http_listen).await?;
        let started = std::time::Instant::now();
        let cluster = cfg.cluster_config()?;
        let broker = tokio::task::spawn_blocking(move || {
            halfmq_broker::Broker::open(cfg, std::sync::Arc::new(halfmq_broker::SystemClock))
        })
        .await??;
        let node = match cluster {
            Some(c) => {
                let applier = halfmq_broker::core::replicated::CoreApplier::new(&broker);
                let node = halfmq_broker::cluster::NodeHandle::start(
                    c,
                    std::sync::Arc::clone(broker.store()),
                    Some(std::sync::Arc::new(applier)),
                )
                .await
                .map_err(|e| anyhow::anyhow!("starting the broker group member: {e}"))?;
                broker.attach_replicator(std::sync::Arc::new(node.clone()));
                Some(node)
            }
            None => None,
        };
        broker.start_background();
        let rep = broker.store().recovery_report();
        tracing::info!(
            %addr,
            recovered_records = rep.records,
            recovery_ms = started.elapsed().as_millis() as u64,
            "halfmq broker listening"
        );
        // Printed on stdout for scripts and tests that start the broker on port 0.
        println!("listening on {addr}");
        halfmq_broker::server::serve_bound(broker, listener, http, stop, node).await?;
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "halfmq-broker: {}",
                halfmq_broker::logging::report(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}
