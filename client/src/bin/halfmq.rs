//! `halfmq`: the command-line tool for people and scripts.
//!
//! `--broker ADDR` (env `HALFMQ_BROKER`, default `127.0.0.1:8081`); `--json`
//! prints one JSON object per line where listed. Exit status is non-zero when
//! an operation fails.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Parser, Subcommand};
use halfmq_client::{
    Admin, Client, Consumer, EndSource, Message, MessageView, Producer, ProducerOptions,
    TransactionProducer, TransactionResolution,
};
use serde_json::json;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

/// Command-line tool for the halfmq broker.
#[derive(Debug, Parser)]
#[command(name = "halfmq", version)]
struct Cli {
    /// Broker address.
    #[arg(
        long,
        global = true,
        env = "HALFMQ_BROKER",
        default_value = "127.0.0.1:8081"
    )]
    broker: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Topics: create, list.
    Topic {
        #[command(subcommand)]
        cmd: TopicCmd,
    },
    /// Sends BODY (or standard input when BODY is absent) COUNT times; prints
    /// each message id as soon as its send is acknowledged.
    Send {
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
        /// How many times to send it.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Delayed delivery: consumers see it this long after it is stored (e.g. 30s, 2h).
        #[arg(long, value_parser = duration)]
        delay: Option<Duration>,
        /// One JSON object per line: message_id, queue_id, queue_offset (and deliver_at_ms).
        #[arg(long)]
        json: bool,
    },
    /// Receives up to COUNT messages, or until TIMEOUT passes with none;
    /// acks each (or, with --nack, asks for a redelivery).
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
        #[arg(long)]
        nack: bool,
        /// Reason given with --nack.
        #[arg(long, default_value = "nacked by halfmq consume")]
        reason: String,
        /// Delay before the redelivery asked by --nack, rounded up to a delay
        /// level (default: the level the message's reconsume times choose).
        #[arg(long, value_parser = duration)]
        nack_delay: Option<Duration>,
        /// Invisible duration of received messages (default: the broker's).
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
        cmd: TxCmd,
    },
    /// Dead-letter queues: list, redrive, purge.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// The broker's counters.
    Stats {
        /// One JSON object.
        #[arg(long)]
        json: bool,
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

#[derive(Debug, Subcommand)]
enum TxCmd {
    /// Sends half messages and resolves them as --local says. Prints each
    /// half as soon as it is acknowledged (JSON: message_id, transaction_id).
    Send {
        /// Topic.
        topic: String,
        /// Body; read from standard input when absent.
        body: Option<String>,
        /// Producer group.
        #[arg(long)]
        group: String,
        /// Tag.
        #[arg(long)]
        tag: Option<String>,
        /// Key (repeatable).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// How many transactions.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// The local transaction's result: commit, rollback, unknown (no
        /// EndTransaction; stay and wait for check-backs), exit (no
        /// EndTransaction; exit at once, like a crashed producer).
        #[arg(long, default_value = "commit", value_parser = ["commit", "rollback", "unknown", "exit"])]
        local: String,
        /// With --local unknown: what this instance's checker answers.
        #[arg(long, default_value = "unknown", value_parser = resolution)]
        answer: TransactionResolution,
        /// With --local unknown: how long to wait for the halves to be resolved.
        #[arg(long = "for", default_value = "60s", value_parser = duration)]
        wait_for: Duration,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Opens a producer session of GROUP and answers every check-back with
    /// --answer until killed or --for elapses; prints each check as a JSON
    /// line (transaction_id, message_id, topic, check_times).
    Checker {
        /// Producer group.
        #[arg(long)]
        group: String,
        /// commit, rollback or unknown.
        #[arg(long, value_parser = resolution)]
        answer: TransactionResolution,
        /// Stop after this long (default: until killed).
        #[arg(long = "for", value_parser = duration)]
        run_for: Option<Duration>,
    },
    /// Unresolved half messages, given-up ones included.
    Pending {
        /// JSON lines: transaction_id, message_id, topic, producer_group,
        /// age_ms, check_times, given_up, note.
        #[arg(long)]
        json: bool,
    },
    /// Operator resolution (given-up halves too): exit 0 when the transaction
    /// ends (or had ended) that way.
    End {
        /// Transaction id.
        transaction_id: String,
        /// Commit it.
        #[arg(
            long,
            conflicts_with = "rollback",
            required_unless_present = "rollback"
        )]
        commit: bool,
        /// Roll it back.
        #[arg(long)]
        rollback: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// A group's dead letters, oldest first (JSON lines: message_id, topic,
    /// reconsume_times, reason, first_delivery_ms, last_delivery_ms, dlq_offset).
    List {
        /// Consumer group.
        group: String,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Sends dead letters back to the group as fresh deliveries.
    Redrive {
        /// Consumer group.
        group: String,
        /// Only this message (default: all).
        #[arg(long)]
        id: Option<String>,
    },
    /// Removes every dead letter of the group.
    Purge {
        /// Consumer group.
        group: String,
    },
}

#[derive(Debug, Subcommand)]
enum TopicCmd {
    /// Creates a topic.
    Create {
        /// Name.
        name: String,
        /// Queues (default: the broker's default_queues).
        #[arg(long, default_value_t = 0)]
        queues: u32,
    },
    /// Lists topics.
    List {
        /// One JSON object per line: name, queues, messages.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halfmq: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::connect(&cli.broker).await?;
    match cli.cmd {
        Cmd::Topic {
            cmd: TopicCmd::Create { name, queues },
        } => {
            Admin::new(client).create_topic(&name, queues).await?;
            println!("created topic {name}");
        }
        Cmd::Topic {
            cmd: TopicCmd::List { json },
        } => {
            for t in Admin::new(client).list_topics().await? {
                if json {
                    println!(
                        "{}",
                        json!({"name": t.name, "queues": t.queues, "messages": t.messages})
                    );
                } else {
                    println!("{}\tqueues={}\tmessages={}", t.name, t.queues, t.messages);
                }
            }
        }
        Cmd::Send {
            topic,
            body,
            tag,
            keys,
            count,
            delay,
            json,
        } => {
            let body = read_body(body)?;
            let producer = Producer::with_options(
                client,
                ProducerOptions {
                    auto_batch: false,
                    ..ProducerOptions::default()
                },
            );
            for _ in 0..count {
                let m = message(&topic, &body, tag.as_deref(), &keys)
                    .with_delay(delay.unwrap_or_default());
                let r = producer.send(m).await?;
                if json {
                    println!(
                        "{}",
                        json!({"message_id": r.message_id, "topic": topic, "queue_id": r.queue_id, "queue_offset": r.queue_offset, "deliver_at_ms": r.deliver_at_ms})
                    );
                } else {
                    println!("{}", r.message_id);
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
                    print_message(&m, json);
                    if nack {
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
        Cmd::Tx { cmd } => run_tx(client, cmd).await?,
        Cmd::Dlq { cmd } => run_dlq(client, cmd).await?,
        Cmd::Stats { json } => {
            let s = Admin::new(client).stats().await?;
            let groups: Vec<_> = s
                .groups
                .iter()
                .map(|g| json!({"group": g.group, "topic": g.topic, "inflight": g.inflight, "lag": g.lag, "acked": g.acked}))
                .collect();
            let v = json!({
                "messages_in": s.messages_in, "bytes_in": s.bytes_in,
                "messages_out": s.messages_out, "bytes_out": s.bytes_out,
                "acks": s.acks, "redeliveries": s.redeliveries,
                "commit_log_bytes": s.commit_log_bytes, "uptime_ms": s.uptime_ms,
                "connections": s.connections, "producer_sessions": s.producer_sessions,
                "pending_halves": s.pending_halves, "delayed_messages": s.delayed_messages,
                "halves_in": s.halves_in, "transactions_committed": s.transactions_committed,
                "transactions_rolled_back": s.transactions_rolled_back,
                "commit_log_fsyncs": s.commit_log_fsyncs,
                "groups": groups,
            });
            if json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
    }
    Ok(())
}

async fn run_dlq(client: Client, cmd: DlqCmd) -> anyhow::Result<()> {
    let admin = Admin::new(client);
    match cmd {
        DlqCmd::List { group, json } => {
            for d in admin.list_dead_letters(&group).await? {
                if json {
                    println!(
                        "{}",
                        json!({"message_id": d.message_id, "topic": d.topic, "reconsume_times": d.reconsume_times,
                               "reason": d.reason, "first_delivery_ms": d.first_delivery_ms,
                               "last_delivery_ms": d.last_delivery_ms, "dlq_offset": d.dlq_offset})
                    );
                } else {
                    println!(
                        "{} topic={} reconsume_times={} reason={:?}",
                        d.message_id, d.topic, d.reconsume_times, d.reason
                    );
                }
            }
        }
        DlqCmd::Redrive { group, id } => {
            let n = admin.redrive_dead_letters(&group, id.as_deref()).await?;
            if let (Some(id), 0) = (&id, n) {
                bail!("no dead letter {id} in group {group}");
            }
            println!("redrove {n} dead letters of {group}");
        }
        DlqCmd::Purge { group } => {
            let n = admin.purge_dead_letters(&group).await?;
            println!("purged {n} dead letters of {group}");
        }
    }
    Ok(())
}

/// BODY, or standard input when it is absent.
fn read_body(body: Option<String>) -> anyhow::Result<Vec<u8>> {
    match body {
        Some(b) => Ok(b.into_bytes()),
        None => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .context("reading the body from standard input")?;
            Ok(v)
        }
    }
}

/// The message `send` and `tx send` build from their flags.
fn message(topic: &str, body: &[u8], tag: Option<&str>, keys: &[String]) -> Message {
    let mut m = Message::new(topic.to_owned(), body.to_vec());
    if let Some(t) = tag {
        m = m.with_tag(t);
    }
    for k in keys {
        m = m.with_key(k.clone());
    }
    m
}

fn print_check(v: &MessageView) {
    println!(
        "{}",
        json!({"transaction_id": v.transaction_id, "message_id": v.message_id, "topic": v.topic, "check_times": v.check_times})
    );
}

async fn run_tx(client: Client, cmd: TxCmd) -> anyhow::Result<()> {
    match cmd {
        TxCmd::Send {
            topic,
            body,
            group,
            tag,
            keys,
            count,
            local,
            answer,
            wait_for,
            json,
        } => {
            let body = read_body(body)?;
            let producer = TransactionProducer::new(
                client.clone(),
                group,
                move |v: MessageView| async move {
                    eprintln!("check-back received: transaction {} (check_times {}), answering {answer:?}", v.transaction_id, v.check_times);
                    answer
                },
            );
            let mut sent = Vec::new();
            for _ in 0..count {
                let m = message(&topic, &body, tag.as_deref(), &keys);
                let tx = producer.send_half(m).await?;
                if json {
                    println!(
                        "{}",
                        json!({"message_id": tx.message_id, "transaction_id": tx.transaction_id, "topic": topic, "local": local})
                    );
                } else {
                    println!("{} {}", tx.message_id, tx.transaction_id);
                }
                match local.as_str() {
                    "commit" => tx.commit().await?,
                    "rollback" => tx.rollback().await?,
                    _ => {}
                }
                sent.push(tx.transaction_id);
            }
            if local == "exit" {
                // A crashed producer: no EndTransaction, no goodbye.
                std::process::exit(0);
            }
            if local == "unknown" {
                let admin = Admin::new(client);
                let deadline = tokio::time::Instant::now() + wait_for;
                loop {
                    // transaction id -> given up
                    let pending: std::collections::HashMap<String, bool> = admin
                        .list_transactions()
                        .await?
                        .into_iter()
                        .map(|t| (t.transaction_id, t.given_up))
                        .collect();
                    let left = sent
                        .iter()
                        .filter(|t| pending.get(*t) == Some(&false))
                        .count();
                    if left == 0 {
                        // Nothing more will check them: ended, or given up.
                        let given_up = sent.iter().filter(|t| pending.contains_key(*t)).count();
                        if given_up == 0 {
                            eprintln!("all {} transactions resolved", sent.len());
                        } else {
                            eprintln!(
                                "{} transactions resolved, {given_up} given up after check_max \
                                 checks (resolve them with `halfmq tx end`)",
                                sent.len() - given_up
                            );
                        }
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        bail!("{left} transactions still pending after {wait_for:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        TxCmd::Checker {
            group,
            answer,
            run_for,
        } => {
            let producer =
                TransactionProducer::new(client, group, move |v: MessageView| async move {
                    print_check(&v);
                    answer
                });
            if !producer.wait_session(Duration::from_secs(10)).await {
                bail!("could not open a producer session");
            }
            eprintln!("checker of group {} answering {answer:?}", producer.group());
            match run_for {
                Some(d) => tokio::time::sleep(d).await,
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        TxCmd::Pending { json } => {
            for t in Admin::new(client).list_transactions().await? {
                if json {
                    println!(
                        "{}",
                        json!({"transaction_id": t.transaction_id, "message_id": t.message_id, "topic": t.topic,
                               "producer_group": t.producer_group, "age_ms": t.age_ms, "check_times": t.check_times,
                               "given_up": t.given_up, "note": t.note})
                    );
                } else {
                    println!(
                        "{} topic={} group={} age_ms={} check_times={} given_up={} {}",
                        t.transaction_id,
                        t.topic,
                        t.producer_group,
                        t.age_ms,
                        t.check_times,
                        t.given_up,
                        t.note
                    );
                }
            }
        }
        TxCmd::End {
            transaction_id,
            commit,
            rollback: _,
        } => {
            let r = if commit {
                TransactionResolution::Commit
            } else {
                TransactionResolution::Rollback
            };
            halfmq_client::end_transaction(&client, &transaction_id, r, EndSource::Operator)
                .await?;
            println!(
                "transaction {transaction_id} {}",
                if commit { "committed" } else { "rolled back" }
            );
        }
    }
    Ok(())
}

fn print_message(m: &halfmq_client::ReceivedMessage, json: bool) {
    let (body, encoding) = match std::str::from_utf8(&m.body) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&m.body),
            "base64",
        ),
    };
    if json {
        println!(
            "{}",
            json!({
                "message_id": m.message_id, "topic": m.topic, "queue_id": m.queue_id,
                "queue_offset": m.queue_offset, "tag": m.tag, "keys": m.keys,
                "reconsume_times": m.reconsume_times, "body": body, "body_encoding": encoding,
                "properties": m.properties, "store_timestamp_ms": m.store_timestamp_ms,
            })
        );
    } else {
        println!(
            "{} {}/{}@{} tag={:?} reconsume_times={} body={}",
            m.message_id, m.topic, m.queue_id, m.queue_offset, m.tag, m.reconsume_times, body
        );
    }
}
