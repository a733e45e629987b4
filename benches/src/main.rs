//! `halfmq-bench`: load-tests a halfmq broker and reports throughput and
//! latency percentiles (HdrHistogram), with a final check that every
//! acknowledged message was consumed exactly once by the consumer group.
//!
//! With no `--broker`, an embedded broker runs in this process on a
//! temporary data directory. Bounded: stops after warm-up + duration + drain
//! timeout. See `benches/README.md`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use halfmq_client::{
    Admin, Client, ClientOptions, Consumer, Message, MessageView, Producer, ProducerOptions,
    TransactionProducer, TransactionResolution,
};
use hdrhistogram::Histogram;

/// The same allocator as the broker binary, so the embedded broker measures
/// as the real one runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 20s, 1m)"))
}

/// Load-test tool for halfmq.
#[derive(Debug, Clone, Parser)]
#[command(name = "halfmq-bench", version)]
struct Args {
    /// Broker address; without it an embedded broker runs on a temp dir.
    #[arg(long)]
    broker: Option<String>,
    /// normal: plain sends; tx: half message + commit through the real
    /// TransactionProducer (with a checker answering COMMIT).
    #[arg(long, default_value = "normal", value_parser = ["normal", "tx"])]
    mode: String,
    /// Producer clients (each with its own connection).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumer clients in one consumer group.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Topic (created if missing).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Queues of the topic when created.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Message body size, bytes (at least 16).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Sends in flight per producer.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Messages per send request (1 = single sends, coalesced by auto-batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Turn off the client's auto-batch.
    #[arg(long)]
    no_auto_batch: bool,
    /// Turn off the producer's automatic idempotency keys (exactly-once
    /// publish), to measure what they cost.
    #[arg(long)]
    no_idempotency_keys: bool,
    /// Give the messages N message groups (message i gets group i mod N);
    /// 0 = none.
    #[arg(long, default_value_t = 0)]
    message_groups: u64,
    /// Declare the consumer group FIFO (each message group in send order,
    /// one message out at a time).
    #[arg(long)]
    fifo: bool,
    /// Open loop: total send rate, messages/s (latency measured from the
    /// scheduled send time: no coordinated omission). Default closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// Measured duration.
    #[arg(long, default_value = "20s", value_parser = duration)]
    duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "3s", value_parser = duration)]
    warmup: Duration,
    /// How long to wait for consumers to catch up at the end.
    #[arg(long, default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,
    /// Flush mode of the embedded broker: sync or async.
    #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
    flush: String,
    /// Print one JSON summary object at the end (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Before measuring, leave this many 16-byte half messages pending (a
    /// producer group with no live session: they are never checked), to
    /// measure sends and ends with a large pending-half index.
    #[arg(long, default_value_t = 0)]
    preload_halves: u64,
    /// Before measuring, leave this many 8-byte messages of the measured
    /// topic scheduled for retry in the measured consumer group (received
    /// and nacked with a 2 h delay), to measure with a large retry backlog.
    #[arg(long, default_value_t = 0)]
    preload_retries: u64,
    /// Threads of this process's async runtime, which runs the clients and
    /// the embedded broker; 0 = one per CPU core (tokio's default). With 1,
    /// an embedded broker and its clients share one thread (tokio's
    /// current-thread scheduler): no cross-thread wake-ups, but no
    /// separate-process figure either.
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// The embedded broker's `sync_wait_spin_us`, as a duration (200us):
    /// with sync flush, how long a request polls for its fdatasync before it
    /// sleeps; 0 = off (the broker's default).
    #[arg(long, value_parser = duration, default_value = "0s")]
    sync_wait_spin: Duration,
    /// Sign requests as this user (a broker with auth on); the secret comes
    /// from the environment variable HALFMQ_SECRET. The user needs pub and
    /// sub on the topic, sub on the consumer group, tx on the producer
    /// group `bench-pg`, and admin on the topic to create it (consumer
    /// groups are named `bench-<pid>`: grant `bench-*`).
    #[arg(long, env = "HALFMQ_USER")]
    user: Option<String>,
    /// Speak TLS, checking the broker's certificate against this PEM CA.
    #[arg(long, env = "HALFMQ_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
}

/// The connection options of every client of the run.
static OPTIONS: std::sync::OnceLock<ClientOptions> = std::sync::OnceLock::new();

/// A client of the run (credentials and TLS as the arguments say).
async fn connect(addr: &str) -> Result<Client, halfmq_client::ClientError> {
    Client::connect_with(addr, OPTIONS.get().cloned().unwrap_or_default()).await
}

fn options(args: &Args) -> anyhow::Result<ClientOptions> {
    let mut o = ClientOptions::default();
    if let Some(u) = &args.user {
        let secret = std::env::var("HALFMQ_SECRET")
            .map_err(|_| anyhow::anyhow!("--user {u}: set HALFMQ_SECRET"))?;
        o.credentials = Some(halfmq_client::Credentials::new(u, &secret));
    }
    if let Some(ca) = &args.tls_ca {
        o.tls = Some(halfmq_client::TlsOptions::from_files(ca, None)?);
    }
    Ok(o)
}

/// Resident memory of this process, bytes (Linux).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// CPU counters from `/proc` (Linux), in USER_HZ ticks (1/100 s, fixed by
/// the kernel ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuSample {
    /// This process's user + system time.
    process_ticks: u64,
    /// Time the hypervisor gave the machine's CPUs to someone else.
    steal_ticks: u64,
    /// All CPU time of the machine (user, nice, system, idle, iowait, irq,
    /// softirq, steal).
    total_ticks: u64,
}

impl CpuSample {
    /// A sample now; `None` where `/proc` does not say.
    fn now() -> Option<CpuSample> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        CpuSample::parse(&stat, &own)
    }

    fn parse(proc_stat: &str, self_stat: &str) -> Option<CpuSample> {
        let cpu: Vec<u64> = proc_stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|s| s.parse().ok())
            .collect::<Option<_>>()?;
        // Fields after the command name (which may hold spaces and ')'):
        // state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = self_stat.rsplit_once(')')?.1.split_whitespace().collect();
        let utime: u64 = rest.get(11)?.parse().ok()?;
        let stime: u64 = rest.get(12)?.parse().ok()?;
        Some(CpuSample {
            process_ticks: utime + stime,
            steal_ticks: *cpu.get(7)?,
            total_ticks: cpu.iter().take(8).sum(),
        })
    }
}

/// The name and CPU ticks (user + system) of one thread, from its
/// `/proc/self/task/TID/stat`.
fn parse_thread_stat(stat: &str) -> Option<(String, u64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let rest: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// CPU ticks of this process's live threads, summed by thread name (threads
/// that exited are not counted); empty where `/proc` does not say.
fn thread_ticks() -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for e in dir.flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if let Some((name, ticks)) = parse_thread_stat(&stat) {
            *by_name.entry(name).or_insert(0) += ticks;
        }
    }
    by_name
}

/// CPU µs per message of each thread name between two [`thread_ticks`]
/// samples; names that used none are left out.
fn thread_cpu_per_msg(
    a: &BTreeMap<String, u64>,
    b: &BTreeMap<String, u64>,
    messages: u64,
) -> BTreeMap<String, f64> {
    if messages == 0 {
        return BTreeMap::new();
    }
    b.iter()
        .filter_map(|(name, &t)| {
            let used = t.saturating_sub(a.get(name).copied().unwrap_or(0));
            (used > 0).then(|| {
                let us = used as f64 * 10_000.0 / messages as f64;
                (name.clone(), (us * 10.0).round() / 10.0)
            })
        })
        .collect()
}

/// (CPU µs of this process per message, % of the machine's CPU time
/// stolen) between two samples.
fn cpu_figures(a: CpuSample, b: CpuSample, messages: u64) -> (Option<f64>, Option<f64>) {
    let own_us = b.process_ticks.saturating_sub(a.process_ticks) as f64 * 10_000.0;
    let total = b.total_ticks.saturating_sub(a.total_ticks);
    let per_msg = (messages > 0).then(|| (own_us / messages as f64 * 10.0).round() / 10.0);
    let steal = (total > 0).then(|| {
        let pct = b.steal_ticks.saturating_sub(a.steal_ticks) as f64 * 100.0 / total as f64;
        (pct * 10.0).round() / 10.0
    });
    (per_msg, steal)
}

/// Locks a mutex, taking over a poisoned one (a panicked task must not
/// lose the run's figures).
trait Locked<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shared run state.
struct Run {
    start: Instant,
    measure_from: Instant,
    measure_to: Instant,
    stop: AtomicBool,
    next_seq: AtomicU64,
    acked: AtomicU64,
    acked_measured: AtomicU64,
    consumed: AtomicU64,
    consumed_measured: AtomicU64,
    errors: AtomicU64,
    /// Error messages printed so far (the first [`PRINTED_ERRORS`]).
    errors_printed: AtomicU64,
    ack_hist: Mutex<Histogram<u64>>,
    e2e_hist: Mutex<Histogram<u64>>,
    /// tx mode: half send alone, and EndTransaction alone, µs.
    half_hist: Mutex<Histogram<u64>>,
    end_hist: Mutex<Histogram<u64>>,
    ledger: Mutex<Ledger>,
    /// Written into every body of 24 bytes or more: messages of an earlier
    /// run on the same broker and topic are not counted.
    run_id: u64,
}

/// What happened to each of this run's sequence numbers (they are dense
/// from 0, so vectors indexed by sequence number).
#[derive(Debug, Default)]
struct Ledger {
    /// The send was acknowledged.
    acked: Vec<bool>,
    /// Times consumed (before or after the acknowledgement was seen).
    consumed: Vec<u32>,
}

impl Ledger {
    fn grow(&mut self, seq: u64) -> usize {
        let i = seq as usize;
        if self.acked.len() <= i {
            self.acked.resize(i + 1, false);
            self.consumed.resize(i + 1, 0);
        }
        i
    }
    fn ack(&mut self, seq: u64) {
        let i = self.grow(seq);
        self.acked[i] = true;
    }
    fn consume(&mut self, seq: u64) {
        let i = self.grow(seq);
        self.consumed[i] += 1;
    }
    /// Every acknowledged message was consumed at least once.
    fn drained(&self) -> bool {
        self.acked
            .iter()
            .zip(&self.consumed)
            .all(|(&a, &c)| !a || c > 0)
    }
    /// (acknowledged, lost: acknowledged but never consumed, duplicates:
    /// deliveries past the first of acknowledged messages).
    fn summary(&self) -> (u64, u64, u64) {
        let (mut acked, mut lost, mut dup) = (0, 0, 0);
        for (&a, &c) in self.acked.iter().zip(&self.consumed) {
            if a {
                acked += 1;
                lost += u64::from(c == 0);
                dup += u64::from(c.saturating_sub(1));
            }
        }
        (acked, lost, dup)
    }
}

/// Error messages a run prints (the rest are only counted).
const PRINTED_ERRORS: u64 = 5;

impl Run {
    /// Counts `n` failed messages of `what` (send, receive, ack) and prints
    /// the error while fewer than [`PRINTED_ERRORS`] have been.
    fn failed(&self, n: u64, what: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(n, Ordering::Relaxed);
        if self.errors_printed.fetch_add(1, Ordering::Relaxed) < PRINTED_ERRORS {
            eprintln!("halfmq-bench: {what} failed: {e}");
        }
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.measure_to
    }
    fn ns_since_start(&self, t: Instant) -> u64 {
        t.duration_since(self.start).as_nanos() as u64
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// seq (8 bytes) | send time, ns since the run's start (8) | run id (8,
/// when `size` >= 24) | filler.
fn body(seq: u64, sent_ns: u64, run_id: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    b.put_u64(seq);
    b.put_u64(sent_ns);
    if size >= 24 {
        b.put_u64(run_id);
    }
    b.resize(size, 0x5A);
    b.freeze()
}

fn main() -> std::process::ExitCode {
    match bench(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "halfmq-bench: {}",
                halfmq_broker::logging::report(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 16, "--size must be at least 16 bytes");
    anyhow::ensure!(
        args.batch >= 1 && args.inflight >= 1,
        "--batch and --inflight must be at least 1"
    );
    let _ = OPTIONS.set(options(&args)?);
    // As the broker does: one thread is tokio's current-thread scheduler.
    let rt = halfmq_broker::server::runtime_builder(args.worker_threads)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut _dir = None;
    let mut embedded = None;
    let addr = match &args.broker {
        Some(a) => a.clone(),
        None => {
            let dir = tempfile::tempdir_in(
                std::env::var("HALFMQ_BENCH_DIR").unwrap_or_else(|_| ".".into()),
            )?;
            let cfg = halfmq_broker::BrokerConfig {
                listen: "127.0.0.1:0".into(),
                http_listen: String::new(),
                data_dir: dir.path().to_path_buf(),
                flush: if args.flush == "async" {
                    halfmq_broker::FlushSetting::Async
                } else {
                    halfmq_broker::FlushSetting::Sync
                },
                max_inflight_per_queue: 65_536,
                sync_wait_spin_us: args.sync_wait_spin.as_micros() as u64,
                ..halfmq_broker::BrokerConfig::default()
            };
            let b = halfmq_broker::start(cfg)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let a = b.addr.to_string();
            embedded = Some(b);
            _dir = Some(dir);
            a
        }
    };
    let admin = Admin::new(connect(&addr).await?);
    match admin.create_topic(&args.topic, args.queues).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(halfmq_client::Code::TopicExists) => {}
        Err(e) => return Err(e).context("creating the topic"),
    }
    let mut preload_rss_bytes = 0i64;
    if args.preload_halves > 0 {
        let before = rss_bytes() as i64;
        let t0 = Instant::now();
        let pre =
            TransactionProducer::new(connect(&addr).await?, "bench-preload", |_m: MessageView| {
                std::future::ready(TransactionResolution::Unknown)
            });
        let mut sent = 0u64;
        while sent < args.preload_halves {
            let n = (args.preload_halves - sent).min(4096);
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let pre = pre.clone();
                    let topic = format!("{}-preload", args.topic);
                    tokio::spawn(
                        async move { pre.send_half(Message::new(topic, vec![0u8; 16])).await },
                    )
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            sent += n;
        }
        drop(pre); // its session closes: the halves stay pending, unchecked
        preload_rss_bytes = rss_bytes() as i64 - before;
        eprintln!(
            "preloaded {sent} pending halves in {:.1}s; process RSS +{:.1} MiB",
            t0.elapsed().as_secs_f64(),
            preload_rss_bytes as f64 / (1 << 20) as f64
        );
    }
    let group = format!("bench-{}", std::process::id());
    if args.fifo {
        admin
            .create_consumer_group(&group, true)
            .await
            .context("declaring the FIFO consumer group")?;
    }
    if args.preload_retries > 0 {
        let before = rss_bytes() as i64;
        let t0 = Instant::now();
        preload_retries(&addr, &args.topic, &group, args.preload_retries).await?;
        let grown = rss_bytes() as i64 - before;
        preload_rss_bytes += grown;
        eprintln!(
            "preloaded {} scheduled retries in {:.1}s; process RSS +{:.1} MiB",
            args.preload_retries,
            t0.elapsed().as_secs_f64(),
            grown as f64 / (1 << 20) as f64
        );
    }
    let start = Instant::now();
    let run = Arc::new(Run {
        start,
        measure_from: start + args.warmup,
        measure_to: start + args.warmup + args.duration,
        stop: AtomicBool::new(false),
        next_seq: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        acked_measured: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        consumed_measured: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        errors_printed: AtomicU64::new(0),
        ack_hist: Mutex::new(hist()),
        e2e_hist: Mutex::new(hist()),
        half_hist: Mutex::new(hist()),
        end_hist: Mutex::new(hist()),
        ledger: Mutex::new(Ledger::default()),
        run_id: u64::from(std::process::id()) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
    });

    // Consumers.
    let consumers_done = Arc::new(AtomicBool::new(false));
    let mut consumer_tasks = Vec::new();
    for _ in 0..args.consumers {
        let c = Consumer::new(connect(&addr).await?, group.clone(), args.topic.clone());
        let run = Arc::clone(&run);
        let done = Arc::clone(&consumers_done);
        consumer_tasks.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let msgs = match c.receive(256, Duration::from_millis(200)).await {
                    Ok(m) => m,
                    Err(e) => {
                        run.failed(1, "receive", &e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if msgs.is_empty() {
                    continue;
                }
                let now = Instant::now();
                let now_ns = run.ns_since_start(now);
                {
                    let mut e2e = run.e2e_hist.locked();
                    let mut ledger = run.ledger.locked();
                    let issued = run.next_seq.load(Ordering::Relaxed);
                    for m in &msgs {
                        if m.body.len() < 16 {
                            continue;
                        }
                        let word = |i: usize| {
                            u64::from_be_bytes(m.body[i..i + 8].try_into().unwrap_or([0; 8]))
                        };
                        let (seq, sent) = (word(0), word(8));
                        if seq >= issued || (m.body.len() >= 24 && word(16) != run.run_id) {
                            continue; // another run's message
                        }
                        ledger.consume(seq);
                        if run.in_window(now) {
                            let _ = e2e.record((now_ns.saturating_sub(sent) / 1000).max(1));
                            run.consumed_measured.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                run.consumed.fetch_add(msgs.len() as u64, Ordering::Relaxed);
                match c.ack_batch(&msgs).await {
                    Ok(rs) => {
                        for e in rs.iter().filter_map(|r| r.as_ref().err()) {
                            run.failed(1, "ack", e);
                        }
                    }
                    Err(e) => run.failed(msgs.len() as u64, "ack", &e),
                }
            }
        }));
    }

    // Producers.
    let mut producer_tasks = Vec::new();
    let per_task_interval = args
        .rate
        .map(|r| send_interval(r, args.producers * args.inflight, args.batch));
    let tasks_total = (args.producers * args.inflight).max(1);
    let mut task_index = 0usize;
    for _ in 0..args.producers {
        let producer_client = connect(&addr).await?;
        let producer = Producer::with_options(
            producer_client.clone(),
            ProducerOptions {
                auto_batch: !args.no_auto_batch,
                auto_idempotency_keys: !args.no_idempotency_keys,
                ..ProducerOptions::default()
            },
        );
        let txp = (args.mode == "tx").then(|| {
            TransactionProducer::new(producer_client.clone(), "bench-pg", |_m: MessageView| {
                std::future::ready(TransactionResolution::Commit)
            })
        });
        for _ in 0..args.inflight {
            // Open loop: spread the tasks' schedules evenly over one interval,
            // so the fixed rate arrives as a steady stream, not in bursts.
            let offset = per_task_interval.map_or(Duration::ZERO, |iv| {
                iv.mul_f64(task_index as f64 / tasks_total as f64)
            });
            task_index += 1;
            let p = producer.clone();
            let txp = txp.clone();
            let run = Arc::clone(&run);
            let a = args.clone();
            producer_tasks.push(tokio::spawn(async move {
                let mut next_at = Instant::now() + offset;
                while !run.stop.load(Ordering::Relaxed) {
                    let scheduled = match per_task_interval {
                        Some(iv) => {
                            tokio::time::sleep_until(next_at.into()).await;
                            let s = next_at;
                            next_at += iv;
                            s
                        }
                        None => Instant::now(),
                    };
                    let sent_ns = run.ns_since_start(scheduled);
                    let seqs: Vec<u64> = (0..a.batch)
                        .map(|_| run.next_seq.fetch_add(1, Ordering::Relaxed))
                        .collect();
                    let msgs: Vec<Message> = seqs
                        .iter()
                        .map(|&s| {
                            let m =
                                Message::new(a.topic.clone(), body(s, sent_ns, run.run_id, a.size));
                            match a.message_groups {
                                0 => m,
                                n => m.with_message_group(format!("g{}", s % n)),
                            }
                        })
                        .collect();
                    let res = if let Some(txp) = &txp {
                        let mut ok = Ok(());
                        for m in msgs {
                            let t0 = Instant::now();
                            let r = match txp.send_half(m).await {
                                Ok(tx) => {
                                    let t1 = Instant::now();
                                    let r = tx.commit().await;
                                    if run.in_window(t0) {
                                        let us = |a: Instant, b: Instant| {
                                            (b.duration_since(a).as_micros() as u64).max(1)
                                        };
                                        let _ = run.half_hist.locked().record(us(t0, t1));
                                        let _ =
                                            run.end_hist.locked().record(us(t1, Instant::now()));
                                    }
                                    r
                                }
                                Err(e) => Err(e),
                            };
                            if r.is_err() {
                                ok = r;
                                break;
                            }
                        }
                        ok
                    } else if a.batch == 1 {
                        p.send(msgs.into_iter().next().expect("batch of one"))
                            .await
                            .map(|_| ())
                    } else {
                        p.send_batch(msgs).await.map(|_| ())
                    };
                    let done = Instant::now();
                    match res {
                        Ok(()) => {
                            {
                                let mut ledger = run.ledger.locked();
                                for s in &seqs {
                                    ledger.ack(*s);
                                }
                            }
                            run.acked.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                            if run.in_window(scheduled) {
                                run.acked_measured
                                    .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                                let us = (done.duration_since(scheduled).as_micros() as u64).max(1);
                                let _ = run.ack_hist.locked().record(us);
                            }
                        }
                        Err(e) => run.failed(seqs.len() as u64, "send", &e),
                    }
                }
            }));
        }
    }

    // CPU counters at both ends of the measured window.
    let (from, to) = (run.measure_from, run.measure_to);
    let cpu_window = tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let (a, ta) = (CpuSample::now(), thread_ticks());
        tokio::time::sleep_until(to.into()).await;
        let (b, tb) = (CpuSample::now(), thread_ticks());
        (a.zip(b), ta, tb)
    });

    // Progress, then stop.
    let end = run.measure_to;
    let mut last = (0u64, 0u64);
    while Instant::now() < end {
        tokio::time::sleep(
            Duration::from_secs(1).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
        let (a, c) = (
            run.acked.load(Ordering::Relaxed),
            run.consumed.load(Ordering::Relaxed),
        );
        let phase = if Instant::now() < run.measure_from {
            "warmup"
        } else {
            "measure"
        };
        eprintln!(
            "[{:>5.1}s {phase}] acked {:>8}/s consumed {:>8}/s errors {}",
            start.elapsed().as_secs_f64(),
            a - last.0,
            c - last.1,
            run.errors.load(Ordering::Relaxed)
        );
        last = (a, c);
    }
    run.stop.store(true, Ordering::Relaxed);
    for t in producer_tasks {
        let _ = t.await;
    }
    let drain_deadline = Instant::now() + args.drain_timeout;
    loop {
        let ledger_done = { run.ledger.locked().drained() };
        if ledger_done || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumers_done.store(true, Ordering::Relaxed);
    for t in consumer_tasks {
        let _ = t.await;
    }

    let secs = args.duration.as_secs_f64();
    let measured = run.acked_measured.load(Ordering::Relaxed);
    let (cpu_us_per_msg, steal_pct, thread_cpu) = match cpu_window.await {
        Ok((samples, ta, tb)) => {
            let (c, s) = samples.map_or((None, None), |(a, b)| cpu_figures(a, b, measured));
            (c, s, thread_cpu_per_msg(&ta, &tb, measured))
        }
        Err(_) => (None, None, BTreeMap::new()),
    };
    let (acked_total, lost, duplicates) = { run.ledger.locked().summary() };
    let acked_per_s = run.acked_measured.load(Ordering::Relaxed) as f64 / secs;
    let consumed_per_s = run.consumed_measured.load(Ordering::Relaxed) as f64 / secs;
    let ack = run.ack_hist.locked().clone();
    let e2e = run.e2e_hist.locked().clone();
    let half = run.half_hist.locked().clone();
    let end = run.end_hist.locked().clone();
    let mut summary = serde_json::json!({
        "mode": args.mode,
        "broker": if args.broker.is_some() { "external" } else { "embedded" },
        "flush": if args.broker.is_some() { "n/a".to_string() } else { args.flush.clone() },
        "size_bytes": args.size,
        "producers": args.producers,
        "consumers": args.consumers,
        "inflight": args.inflight,
        "batch": args.batch,
        "auto_batch": !args.no_auto_batch,
        "rate": args.rate,
        "duration_s": secs,
        "acked_per_s": acked_per_s.round(),
        "consumed_per_s": consumed_per_s.round(),
        "acked_mb_per_s": (acked_per_s * args.size as f64 / 1e6 * 100.0).round() / 100.0,
        "ack_p50_us": ack.value_at_quantile(0.50),
        "ack_p90_us": ack.value_at_quantile(0.90),
        "ack_p99_us": ack.value_at_quantile(0.99),
        "ack_p999_us": ack.value_at_quantile(0.999),
        "ack_max_us": ack.max(),
        "e2e_p50_us": e2e.value_at_quantile(0.50),
        "e2e_p90_us": e2e.value_at_quantile(0.90),
        "e2e_p99_us": e2e.value_at_quantile(0.99),
        "e2e_p999_us": e2e.value_at_quantile(0.999),
        "e2e_max_us": e2e.max(),
        "half_p50_us": half.value_at_quantile(0.50),
        "half_p99_us": half.value_at_quantile(0.99),
        "end_p50_us": end.value_at_quantile(0.50),
        "end_p99_us": end.value_at_quantile(0.99),
        "errors": run.errors.load(Ordering::Relaxed),
        "acked_total": acked_total,
        "lost": lost,
        "duplicates": duplicates,
        "preload_halves": args.preload_halves,
        "preload_rss_bytes": preload_rss_bytes,
        "worker_threads": args.worker_threads,
        "sync_wait_spin_us": if args.broker.is_some() { None } else { Some(args.sync_wait_spin.as_micros() as u64) },
        "process_cpu_us_per_msg": cpu_us_per_msg,
        "thread_cpu_us_per_msg": thread_cpu,
        "steal_pct": steal_pct,
    });
    summary["idempotency_keys"] = serde_json::json!(!args.no_idempotency_keys);
    summary["message_groups"] = serde_json::json!(args.message_groups);
    summary["fifo"] = serde_json::json!(args.fifo);
    if args.json {
        println!("{summary}");
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if let Some(b) = embedded {
        b.shutdown().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let errors = run.errors.load(Ordering::Relaxed);
    anyhow::ensure!(
        errors == 0,
        "{errors} messages failed (the first errors are printed above); the figures are not a clean run's"
    );
    Ok(())
}

/// Sends `n` 8-byte messages (too short for the ledger: never counted) to
/// `topic`, receives them in `group` and nacks each with a 2 h delay, so that
/// `n` retries stay scheduled in the group's retry queue during the run.
async fn preload_retries(addr: &str, topic: &str, group: &str, n: u64) -> anyhow::Result<()> {
    let c = connect(addr).await?;
    let p = Producer::new(c.clone());
    let mut sent = 0u64;
    while sent < n {
        let k = (n - sent).min(4096);
        let tasks: Vec<_> = (0..k)
            .map(|_| {
                let p = p.clone();
                let topic = topic.to_owned();
                tokio::spawn(async move { p.send(Message::new(topic, &b"preload!"[..])).await })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        sent += k;
    }
    let cons = Consumer::new(c, group.to_owned(), topic.to_owned())
        .with_invisible_duration(Duration::from_secs(600));
    let mut nacked = 0u64;
    while nacked < n {
        let msgs = cons.receive(256, Duration::from_millis(500)).await?;
        anyhow::ensure!(!msgs.is_empty(), "preload: only {nacked} of {n} came back");
        let tasks: Vec<_> = msgs
            .into_iter()
            .map(|m| {
                let cons = cons.clone();
                tokio::spawn(async move {
                    cons.nack(&m, "preload", Some(Duration::from_secs(7200)))
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await??;
            nacked += 1;
        }
    }
    Ok(())
}

/// Open loop: how often each of `tasks` sending tasks sends one request of
/// `batch` messages, so that together they send `rate` messages/s.
fn send_interval(rate: u64, tasks: usize, batch: usize) -> Duration {
    Duration::from_secs_f64((tasks * batch.max(1)) as f64 / rate.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_figures_from_proc() {
        let stat = |user: u64, idle: u64, steal: u64| {
            format!("cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3\n")
        };
        // A command name with spaces and a parenthesis.
        let own = |t: u64| format!("42 (halfmq bench) x) S 1 2 3 4 5 6 7 8 9 10 {t} {t} 0 0 20");
        let a = CpuSample::parse(&stat(1000, 5000, 100), &own(300)).unwrap();
        assert_eq!(a.process_ticks, 600);
        assert_eq!(a.steal_ticks, 100);
        assert_eq!(a.total_ticks, 6100);
        // 1 s later on 2 CPUs: 200 ticks, 50 of them stolen; the process
        // used 80 ticks (0.8 s) for 1,000 messages.
        let b = CpuSample::parse(&stat(1100, 5050, 150), &own(340)).unwrap();
        assert_eq!(cpu_figures(a, b, 1_000), (Some(800.0), Some(25.0)));
        assert_eq!(cpu_figures(a, b, 0), (None, Some(25.0)));
        assert!(CpuSample::parse("intr 1 2", &own(1)).is_none());
    }

    #[test]
    fn thread_cpu_by_name_from_proc() {
        let stat = |name: &str, t: u64| format!("7 ({name}) S 1 2 3 4 5 6 7 8 9 10 {t} {t} 0 0");
        assert_eq!(
            parse_thread_stat(&stat("tokio-rt-worker", 5)),
            Some(("tokio-rt-worker".to_owned(), 10))
        );
        // A name with a space and a parenthesis.
        assert_eq!(
            parse_thread_stat(&stat("a) b", 1)),
            Some(("a) b".to_owned(), 2))
        );
        assert_eq!(parse_thread_stat("7 (x) S 1"), None);
        let a = BTreeMap::from([("main".to_owned(), 100), ("flusher".to_owned(), 7)]);
        // 1,000 messages: main used 30 ticks (300 ms), the flusher none, a
        // new thread 2 ticks.
        let b = BTreeMap::from([
            ("main".to_owned(), 130),
            ("flusher".to_owned(), 7),
            ("sled-io".to_owned(), 2),
        ]);
        assert_eq!(
            thread_cpu_per_msg(&a, &b, 1_000),
            BTreeMap::from([("main".to_owned(), 300.0), ("sled-io".to_owned(), 20.0)])
        );
        assert!(thread_cpu_per_msg(&a, &b, 0).is_empty());
    }

    #[test]
    fn open_loop_rate_counts_messages_not_requests() {
        // 64 tasks at 8,000 messages/s: one send each per 8 ms; with batches
        // of 16, one request each per 128 ms (still 8,000 messages/s).
        assert_eq!(send_interval(8_000, 64, 1), Duration::from_millis(8));
        assert_eq!(send_interval(8_000, 64, 16), Duration::from_millis(128));
    }

    #[test]
    fn ledger_counts_lost_and_duplicates_of_acknowledged_messages_only() {
        let mut l = Ledger::default();
        l.consume(3); // consumed before its ack was seen
        l.ack(3);
        l.ack(0);
        l.ack(1);
        l.consume(1);
        l.consume(1);
        l.consume(2); // never acknowledged (its send failed): not counted
        assert!(!l.drained(), "0 was acknowledged and never consumed");
        assert_eq!(l.summary(), (3, 1, 1));
        l.consume(0);
        assert!(l.drained());
        assert_eq!(l.summary(), (3, 0, 1));
    }

    #[test]
    fn body_carries_seq_time_and_run_id() {
        let b = body(7, 99, 0xABCD, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(&b[0..8], &7u64.to_be_bytes());
        assert_eq!(&b[8..16], &99u64.to_be_bytes());
        assert_eq!(&b[16..24], &0xABCDu64.to_be_bytes());
        assert_eq!(body(7, 99, 0xABCD, 16).len(), 16);
    }
}
