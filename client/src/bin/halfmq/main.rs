//! `halfmq`: the command-line tool for people and scripts.
//!
//! `--broker HOST:PORT` (env `HALFMQ_BROKER`, default `127.0.0.1:8081`);
//! `--user NAME` (env `HALFMQ_USER`) signs requests with the secret in
//! `HALFMQ_SECRET` (never a flag); `--tls-ca PEM` speaks TLS.
//! `--json` prints one JSON object per line where listed. Exit status is
//! non-zero when an operation fails; 0 when the reader of its output went
//! away (`| head -1`), with nothing more printed or acked.
//!
//! # Layout
//! - `main.rs`: the command line, `send` and `consume`.
//! - `tx.rs`: `tx send / checker / pending / end`.
//! - `admin.rs`: `topic`, `group`, `dlq`, `stats`.
//! - `security.rs`: `user`, `acl`.
//! - `out.rs`: stdout lines (broken pipes), bodies, tables, error reports.

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use halfmq_client::{Client, Consumer, Message, Producer, ProducerOptions, TransactionResolution};
use serde_json::json;

mod admin;
mod out;
mod security;
mod tx;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

/// Command-line tool for the halfmq broker.
#[derive(Debug, Parser)]
#[command(name = "halfmq", version)]
struct Cli {
    /// Broker address, HOST:PORT; for a broker group, its members'
    /// addresses comma-separated (requests go to the leader and follow it
    /// across a failover).
    #[arg(
        long,
        global = true,
        env = "HALFMQ_BROKER",
        default_value = "127.0.0.1:8081"
    )]
    broker: String,
    /// Sign requests as this user (a broker with auth on); the secret is
    /// read from the environment variable HALFMQ_SECRET, never a flag.
    #[arg(long, global = true, env = "HALFMQ_USER")]
    user: Option<String>,
    /// Speak TLS, checking the broker's certificate against this PEM CA.
    #[arg(long, global = true, env = "HALFMQ_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// With --tls-ca: this client's PEM certificate (a broker requiring
    /// client certificates).
    #[arg(long, global = true, env = "HALFMQ_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM key of --tls-cert.
    #[arg(long, global = true, env = "HALFMQ_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Connection options from the command line and environment.
fn options(cli: &Cli) -> anyhow::Result<halfmq_client::ClientOptions> {
    let mut o = halfmq_client::ClientOptions::default();
    if let Some(user) = &cli.user {
        let Some(secret) = std::env::var("HALFMQ_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            anyhow::bail!(
                "--user {user}: set its secret in the environment variable HALFMQ_SECRET"
            );
        };
        o.credentials = Some(halfmq_client::Credentials::new(user, &secret));
    }
    match (&cli.tls_ca, &cli.tls_cert, &cli.tls_key) {
        (Some(ca), cert, key) => {
            let id = cert.as_deref().zip(key.as_deref());
            o.tls = Some(halfmq_client::TlsOptions::from_files(ca, id)?);
        }
        (None, Some(_), _) => anyhow::bail!("--tls-cert needs --tls-ca"),
        _ => {}
    }
    Ok(o)
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Topics: create, list, delete.
    Topic {
        #[command(subcommand)]
        cmd: admin::TopicCmd,
    },
    /// Sends BODY (or standard input when BODY is absent) COUNT times; prints
    /// each message id as soon as its send is acknowledged.
    Send {
        #[command(flatten)]
        msg: MessageArgs,
        /// Delayed delivery: consumers see it this long after it is stored (e.g. 30s, 2h).
        #[arg(long, value_parser = duration)]
        delay: Option<Duration>,
        /// One JSON object per line: message_id, topic, queue_id,
        /// queue_offset (absent for a delayed message), deliver_at_ms,
        /// duplicate.
        #[arg(long)]
        json: bool,
    },
    /// Receives up to COUNT messages, or until TIMEOUT passes with none;
    /// prints each (one line) and acks it (or, with --nack, asks for a
    /// redelivery; with --no-ack, leaves it to expire).
    Consume {
        /// Topic.
        topic: String,
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// Tag expression: '*' or 'a||b'.
        #[arg(long, default_value = "*")]
        tag: String,
        /// Stop after this many messages (default: no limit).
        #[arg(long)]
        count: Option<u64>,
        /// Stop when no message arrives for this long.
        #[arg(long, default_value = "10s", value_parser = duration)]
        timeout: Duration,
        /// Nack instead of ack (the message is redelivered, reconsume times + 1).
        #[arg(long, conflicts_with = "no_ack")]
        nack: bool,
        /// Neither ack nor nack: the messages come back after their
        /// invisible duration (to inspect a topic, or watch FIFO order).
        #[arg(long)]
        no_ack: bool,
        /// Reason given with --nack.
        #[arg(long, default_value = "nacked by halfmq consume")]
        reason: String,
        /// Delay before the redelivery asked by --nack, rounded up to a delay
        /// level (default: the level the message's reconsume times choose).
        #[arg(long, value_parser = duration)]
        nack_delay: Option<Duration>,
        /// Invisible duration of received messages (default: the broker's;
        /// at most its max_invisible_duration_ms).
        #[arg(long, value_parser = duration)]
        invisible: Option<Duration>,
        /// One JSON object per line (body as UTF-8, or base64 when it is not:
        /// see body_encoding).
        #[arg(long)]
        json: bool,
    },
    /// Transactional messages: send halves, answer check-backs, list and
    /// resolve pending transactions.
    Tx {
        #[command(subcommand)]
        cmd: tx::TxCmd,
    },
    /// Consumer groups: list, reset offsets.
    Group {
        #[command(subcommand)]
        cmd: admin::GroupCmd,
    },
    /// Dead-letter queues: list, show, redrive, purge.
    Dlq {
        #[command(subcommand)]
        cmd: admin::DlqCmd,
    },
    /// A broker group: status of its members, membership changes.
    Cluster {
        #[command(subcommand)]
        cmd: admin::ClusterCmd,
    },
    /// Users (a broker with auth on): create, delete, list.
    User {
        #[command(subcommand)]
        cmd: security::UserCmd,
    },
    /// Users' policies: grant, revoke, list.
    Acl {
        #[command(subcommand)]
        cmd: security::AclCmd,
    },
    /// The broker's counters.
    Stats {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Prints a shell completion script: `halfmq completions bash >
    /// /etc/bash_completion.d/halfmq`, or `source <(halfmq completions bash)`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn resolution(s: &str) -> Result<TransactionResolution, String> {
    match s {
        "commit" => Ok(TransactionResolution::Commit),
        "rollback" => Ok(TransactionResolution::Rollback),
        "unknown" => Ok(TransactionResolution::Unknown),
        _ => Err("commit, rollback or unknown".into()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(out::stderr_colour())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<out::StdoutClosed>().is_some() => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("halfmq: {}", out::report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Completions { shell } = cli.cmd {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "halfmq", &mut text);
        return out::line(String::from_utf8_lossy(&text).trim_end());
    }
    let client = Client::connect_with(&cli.broker, options(&cli)?).await?;
    match cli.cmd {
        Cmd::User { cmd } => security::user(client, cmd).await?,
        Cmd::Acl { cmd } => security::acl(client, cmd).await?,
        Cmd::Topic { cmd } => admin::topic(client, cmd).await?,
        Cmd::Group { cmd } => admin::group(client, cmd).await?,
        Cmd::Dlq { cmd } => admin::dlq(client, cmd).await?,
        Cmd::Stats { json } => admin::stats(client, json).await?,
        Cmd::Cluster { cmd } => admin::cluster(client, cmd).await?,
        Cmd::Tx { cmd } => tx::run(client, cmd).await?,
        Cmd::Send { msg, delay, json } => {
            let template = msg.message()?;
            let producer = Producer::with_options(
                client,
                ProducerOptions {
                    auto_batch: false,
                    ..ProducerOptions::default()
                },
            );
            for i in 0..msg.count {
                let m = msg.nth(&template, i).with_delay(delay.unwrap_or_default());
                let r = producer.send(m).await?;
                if json {
                    let mut v = json!({"message_id": r.message_id, "topic": msg.topic,
                        "queue_id": r.queue_id, "duplicate": r.duplicate});
                    if let Some(o) = r.queue_offset {
                        v["queue_offset"] = json!(o);
                    }
                    if r.deliver_at_ms > 0 {
                        v["deliver_at_ms"] = json!(r.deliver_at_ms);
                    }
                    out::line(v)?;
                } else {
                    if r.duplicate {
                        note_duplicate(&r.message_id);
                    }
                    out::line(&r.message_id)?;
                }
            }
        }
        Cmd::Consume {
            topic,
            group,
            tag,
            count,
            timeout,
            nack,
            no_ack,
            reason,
            nack_delay,
            invisible,
            json,
        } => {
            let mut consumer = Consumer::new(client, group, topic).with_tag_expression(tag);
            if let Some(d) = invisible {
                consumer = consumer.with_invisible_duration(d);
            }
            let mut got = 0u64;
            while count.is_none_or(|c| got < c) {
                let want = count.map_or(32, |c| (c - got).min(32)) as u32;
                let msgs = consumer.receive(want, timeout).await?;
                if msgs.is_empty() {
                    break;
                }
                for m in msgs {
                    // Printed before it is acked: a reader that has gone
                    // (EPIPE) stops the command here, and this message and
                    // the rest come back after their invisible duration.
                    out::line(message_line(&m, json))?;
                    if no_ack {
                        // Left to expire.
                    } else if nack {
                        consumer.nack(&m, &reason, nack_delay).await?;
                    } else {
                        consumer.ack(&m).await?;
                    }
                    got += 1;
                }
            }
            if let Some(c) = count {
                if got < c {
                    eprintln!("halfmq: received {got} of {c} messages before the timeout");
                }
            }
        }
        Cmd::Completions { .. } => {}
    }
    Ok(())
}

/// What `send` and `tx send` build their messages from.
#[derive(Debug, clap::Args)]
struct MessageArgs {
    /// Topic.
    topic: String,
    /// Body; read from standard input when absent.
    body: Option<String>,
    /// Tag.
    #[arg(long)]
    tag: Option<String>,
    /// Key (repeatable).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// How many to send.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Message group (1-128 bytes): its messages go to one queue, and a FIFO
    /// consumer group receives them in send order.
    #[arg(long, value_name = "G")]
    message_group: Option<String>,
    /// Idempotency key (1-128 bytes): a send repeating a key stored on the
    /// topic within the broker's dedup window stores nothing and prints the
    /// first send's ids with duplicate: true. With --count N above 1 the
    /// messages get K-0 .. K-(N-1). Without it every message gets an
    /// automatic key, so retries never store one twice.
    #[arg(long, value_name = "K")]
    idempotency_key: Option<String>,
}

impl MessageArgs {
    /// The message (BODY, or standard input when it is absent).
    fn message(&self) -> anyhow::Result<Message> {
        let body = match &self.body {
            Some(b) => b.clone().into_bytes(),
            None => {
                let mut v = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut v)
                    .context("reading the body from standard input")?;
                v
            }
        };
        let mut m = Message::new(self.topic.clone(), body);
        if let Some(t) = &self.tag {
            m = m.with_tag(t);
        }
        for k in &self.keys {
            m = m.with_key(k.clone());
        }
        if let Some(g) = &self.message_group {
            m = m.with_message_group(g.clone());
        }
        Ok(m)
    }

    /// The `i`th of the `count` messages built from `template`: its
    /// idempotency key is K, or K-i when more than one is sent.
    fn nth(&self, template: &Message, i: u64) -> Message {
        let m = template.clone();
        match &self.idempotency_key {
            Some(k) if self.count > 1 => m.with_idempotency_key(format!("{k}-{i}")),
            Some(k) => m.with_idempotency_key(k.clone()),
            None => m,
        }
    }
}

/// Says on stderr that a send stored nothing (text output; JSON lines carry
/// `duplicate`).
pub(crate) fn note_duplicate(message_id: &str) {
    eprintln!(
        "halfmq: {message_id}: idempotency key stored before: nothing stored, \
         the first send's ids printed"
    );
}

/// One received message on one line: JSON, or text with the body escaped
/// (or base64) and, for a retry, its place in the topic.
fn message_line(m: &halfmq_client::ReceivedMessage, json: bool) -> String {
    if json {
        let (body, encoding) = out::body(&m.body);
        let mut v = json!({
            "message_id": m.message_id, "topic": m.topic, "queue_id": m.queue_id,
            "queue_offset": m.queue_offset, "tag": m.tag, "keys": m.keys,
            "reconsume_times": m.reconsume_times, "body": body, "body_encoding": encoding,
            "properties": m.properties, "store_timestamp_ms": m.store_timestamp_ms,
            "retry": m.retry, "message_group": m.message_group,
        });
        if let Some(o) = m.original_queue_offset {
            v["original_queue_offset"] = json!(o);
        }
        return v.to_string();
    }
    let place = if m.retry {
        match m.original_queue_offset {
            Some(o) => format!(
                "{}/{}@{o} (retry, retry queue offset {})",
                m.topic, m.queue_id, m.queue_offset
            ),
            None => format!(
                "{}/{} (retry, retry queue offset {})",
                m.topic, m.queue_id, m.queue_offset
            ),
        }
    } else {
        format!("{}/{}@{}", m.topic, m.queue_id, m.queue_offset)
    };
    let mut line = format!("{} {place}", m.message_id);
    if !m.tag.is_empty() {
        line.push_str(&format!(" tag={:?}", m.tag));
    }
    if !m.keys.is_empty() {
        line.push_str(&format!(" keys={:?}", m.keys.join(",")));
    }
    if let Some(g) = &m.message_group {
        line.push_str(&format!(" message_group={g:?}"));
    }
    if m.reconsume_times > 0 {
        line.push_str(&format!(" reconsume_times={}", m.reconsume_times));
    }
    line.push(' ');
    line.push_str(&out::body_field(&m.body));
    line
}
