//! `halfmq topic`, `group`, `dlq`, `cluster` and `stats`.

use std::collections::BTreeMap;

use anyhow::bail;
use clap::Subcommand;
use halfmq_client::{Admin, Client, Cluster, ResetTo};
use serde_json::json;

use crate::out;

#[derive(Debug, Subcommand)]
pub enum TopicCmd {
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
    /// Deletes a topic: its consume queues, and every consumer group's
    /// progress and retries on it. Refused while half messages or delayed
    /// messages of it are pending.
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Declares a consumer group (groups that were never declared are
    /// ordinary ones, created by their first receive).
    Create {
        /// Consumer group.
        group: String,
        /// Ordered: each message group is received in send order, one
        /// message at a time.
        #[arg(long)]
        fifo: bool,
    },
    /// Consumer groups with their kind, topics, lag, in-flight messages and
    /// dead letters.
    List {
        /// One JSON object per line: group, fifo, topics, lag, inflight,
        /// acked, dead_letters.
        #[arg(long)]
        json: bool,
    },
    /// Moves a group's consumer offsets on a topic; its in-flight messages
    /// of the topic are dropped (they come again unless the new offset is
    /// past them). Prints each queue's new consumer offset.
    ResetOffset {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// earliest, latest, or a time: ms since the Unix epoch, or RFC 3339
        /// (2026-12-02T18:00:00Z): the first message stored at or after it.
        #[arg(long, value_parser = reset_to)]
        to: ResetTo,
        /// JSON lines: queue_id, queue_offset.
        #[arg(long)]
        json: bool,
    },
}

fn reset_to(s: &str) -> Result<ResetTo, String> {
    match s {
        "earliest" => Ok(ResetTo::Earliest),
        "latest" => Ok(ResetTo::Latest),
        _ => {
            if let Ok(ms) = s.parse::<u64>() {
                return Ok(ResetTo::Timestamp(ms));
            }
            humantime::parse_rfc3339_weak(s)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| ResetTo::Timestamp(d.as_millis() as u64))
                .ok_or_else(|| {
                    "earliest, latest, ms since the epoch, or an RFC 3339 time such as 2026-12-02T18:00:00Z".into()
                })
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// A group's dead letters, oldest first. JSON lines: message_id, topic,
    /// queue_id, queue_offset, reconsume_times, reason, first_delivery_ms,
    /// last_delivery_ms, dlq_offset, tag, keys, properties, body,
    /// body_encoding (body_omitted when the listing grew too large: use
    /// `dlq show`).
    List {
        /// Consumer group.
        group: String,
        /// JSON lines, with bodies.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter with its body.
    Show {
        /// Consumer group.
        group: String,
        /// Message id.
        message_id: String,
        /// One JSON object (fields as `dlq list --json`).
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

pub async fn topic(client: Client, cmd: TopicCmd) -> anyhow::Result<()> {
    let admin = Admin::new(client);
    match cmd {
        TopicCmd::Create { name, queues } => {
            admin.create_topic(&name, queues).await?;
            out::line(format!("created topic {name}"))?;
        }
        TopicCmd::List { json } => {
            let topics = admin.list_topics().await?;
            if json {
                for t in topics {
                    out::line(json!({"name": t.name, "queues": t.queues, "messages": t.messages}))?;
                }
            } else {
                let mut rows = vec![vec!["topic".into(), "queues".into(), "messages".into()]];
                rows.extend(
                    topics
                        .into_iter()
                        .map(|t| vec![t.name, t.queues.to_string(), t.messages.to_string()]),
                );
                out::line(out::table(&rows))?;
            }
        }
        TopicCmd::Delete { name } => {
            admin.delete_topic(&name).await?;
            out::line(format!("deleted topic {name}"))?;
        }
    }
    Ok(())
}

/// Per group: (topics, lag, inflight, acked).
type GroupRow = (Vec<String>, u64, u64, u64);

pub async fn group(client: Client, cmd: GroupCmd) -> anyhow::Result<()> {
    let admin = Admin::new(client);
    match cmd {
        GroupCmd::Create { group, fifo } => {
            admin.create_consumer_group(&group, fifo).await?;
            out::line(format!(
                "consumer group {group} declared ({})",
                if fifo { "FIFO" } else { "ordinary" }
            ))?;
        }
        GroupCmd::List { json } => {
            let fifo: BTreeMap<String, bool> =
                admin.list_consumer_groups().await?.into_iter().collect();
            let stats = admin.stats().await?;
            let dead: BTreeMap<String, u64> =
                admin.dead_letter_counts().await?.into_iter().collect();
            let mut groups: BTreeMap<String, GroupRow> = BTreeMap::new();
            for g in stats.groups {
                let e = groups.entry(g.group).or_default();
                e.0.push(g.topic);
                e.1 += g.lag;
                e.2 += g.inflight;
                e.3 += g.acked;
            }
            for g in dead.keys().chain(fifo.keys()) {
                groups.entry(g.clone()).or_default();
            }
            let is_fifo = |g: &str| fifo.get(g).copied().unwrap_or(false);
            if json {
                for (g, (topics, lag, inflight, acked)) in groups {
                    let d = dead.get(&g).copied().unwrap_or(0);
                    out::line(
                        json!({"group": g, "fifo": is_fifo(&g), "topics": topics, "lag": lag,
                               "inflight": inflight, "acked": acked, "dead_letters": d}),
                    )?;
                }
            } else {
                let mut rows = vec![[
                    "group",
                    "fifo",
                    "topics",
                    "lag",
                    "inflight",
                    "acked",
                    "dead_letters",
                ]
                .map(String::from)
                .to_vec()];
                for (g, (topics, lag, inflight, acked)) in groups {
                    let d = dead.get(&g).copied().unwrap_or(0);
                    rows.push(vec![
                        g.clone(),
                        if is_fifo(&g) { "yes" } else { "no" }.into(),
                        topics.join(","),
                        lag.to_string(),
                        inflight.to_string(),
                        acked.to_string(),
                        d.to_string(),
                    ]);
                }
                out::line(out::table(&rows))?;
            }
        }
        GroupCmd::ResetOffset {
            group,
            topic,
            to,
            json,
        } => {
            let offsets = admin.reset_offset(&group, &topic, to).await?;
            if json {
                for (q, o) in offsets {
                    out::line(json!({"queue_id": q, "queue_offset": o}))?;
                }
            } else {
                let each: Vec<String> = offsets
                    .iter()
                    .map(|(q, o)| format!("queue {q} at {o}"))
                    .collect();
                out::line(format!(
                    "reset group {group} on topic {topic}: {}",
                    each.join(", ")
                ))?;
            }
        }
    }
    Ok(())
}

fn dead_letter_json(d: &halfmq_client::DeadLetter) -> serde_json::Value {
    let (body, encoding) = out::body(&d.body);
    let mut v = json!({
        "message_id": d.message_id, "topic": d.topic, "queue_id": d.queue_id,
        "reconsume_times": d.reconsume_times, "reason": d.reason,
        "first_delivery_ms": d.first_delivery_ms, "last_delivery_ms": d.last_delivery_ms,
        "dlq_offset": d.dlq_offset, "copies": d.copies, "tag": d.tag, "keys": d.keys, "properties": d.properties,
    });
    if let Some(o) = d.queue_offset {
        v["queue_offset"] = json!(o);
    }
    if d.body_omitted {
        v["body_omitted"] = json!(true);
    } else {
        v["body"] = json!(body);
        v["body_encoding"] = json!(encoding);
    }
    v
}

fn dead_letter_text(d: &halfmq_client::DeadLetter, with_body: bool) -> String {
    let place = match d.queue_offset {
        Some(o) => format!("{}/{}@{o}", d.topic, d.queue_id),
        None => d.topic.clone(),
    };
    let mut line = format!(
        "{} {place} reconsume_times={} reason={:?}",
        d.message_id, d.reconsume_times, d.reason
    );
    if with_body {
        line.push(' ');
        line.push_str(&out::body_field(&d.body));
    }
    line
}

pub async fn dlq(client: Client, cmd: DlqCmd) -> anyhow::Result<()> {
    let admin = Admin::new(client);
    match cmd {
        DlqCmd::List { group, json } => {
            if json {
                for d in admin.list_dead_letters_with_bodies(&group).await? {
                    out::line(dead_letter_json(&d))?;
                }
            } else {
                for d in admin.list_dead_letters(&group).await? {
                    out::line(dead_letter_text(&d, false))?;
                }
            }
        }
        DlqCmd::Show {
            group,
            message_id,
            json,
        } => {
            let Some(d) = admin.dead_letter(&group, &message_id).await? else {
                bail!("no dead letter {message_id} in group {group}");
            };
            if json {
                out::line(dead_letter_json(&d))?;
            } else {
                out::line(dead_letter_text(&d, true))?;
            }
        }
        DlqCmd::Redrive { group, id } => {
            let n = admin.redrive_dead_letters(&group, id.as_deref()).await?;
            if let (Some(id), 0) = (&id, n) {
                bail!("no dead letter {id} in group {group}");
            }
            out::line(format!("redrove {n} dead letters of {group}"))?;
        }
        DlqCmd::Purge { group } => {
            let n = admin.purge_dead_letters(&group).await?;
            out::line(format!("purged {n} dead letters of {group}"))?;
        }
    }
    Ok(())
}

pub async fn stats(client: Client, json: bool) -> anyhow::Result<()> {
    let s = Admin::new(client).stats().await?;
    if json {
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
            "duplicates": s.duplicates, "dedup_keys": s.dedup_keys,
            "dedup_evicted": s.dedup_evicted,
            "groups": groups,
        });
        return out::line(v);
    }
    let since = "since start";
    let now = "now";
    let mut rows = vec![vec!["counter".into(), "value".into(), "".into()]];
    for (name, value, kind) in [
        ("messages_in", s.messages_in, since),
        ("bytes_in", s.bytes_in, since),
        ("messages_out", s.messages_out, since),
        ("bytes_out", s.bytes_out, since),
        ("acks", s.acks, since),
        ("redeliveries", s.redeliveries, since),
        ("halves_in", s.halves_in, since),
        ("transactions_committed", s.transactions_committed, since),
        (
            "transactions_rolled_back",
            s.transactions_rolled_back,
            since,
        ),
        ("commit_log_fsyncs", s.commit_log_fsyncs, since),
        ("duplicates", s.duplicates, since),
        ("dedup_evicted", s.dedup_evicted, since),
        ("uptime_ms", s.uptime_ms, since),
        ("pending_halves", s.pending_halves, now),
        ("delayed_messages", s.delayed_messages, now),
        ("commit_log_bytes", s.commit_log_bytes, now),
        ("connections", s.connections, now),
        ("producer_sessions", s.producer_sessions, now),
        ("dedup_keys", s.dedup_keys, now),
    ] {
        rows.push(vec![name.into(), value.to_string(), kind.into()]);
    }
    let mut text = out::table(&rows);
    if !s.groups.is_empty() {
        let mut g = vec![["group", "topic", "inflight", "lag", "acked"]
            .map(String::from)
            .to_vec()];
        for x in &s.groups {
            g.push(vec![
                x.group.clone(),
                x.topic.clone(),
                x.inflight.to_string(),
                x.lag.to_string(),
                x.acked.to_string(),
            ]);
        }
        text.push_str("\n\n");
        text.push_str(&out::table(&g));
    }
    text.push_str(
        "\n\n\"since start\" counters restart from 0 when the broker restarts; the others are its state now.",
    );
    out::line(text)
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Every member's role, term, applied index and lag behind the leader
    /// (each member in --broker, and every member they name, is asked).
    Status {
        /// One JSON object per member: node_id, address, role (leader |
        /// follower | learner | candidate | unreachable), term,
        /// last_applied, lag.
        #[arg(long)]
        json: bool,
    },
    /// Adds node ID, whose client address is ADDR, as a learner: it
    /// catches up from the log and does not vote. Returns once it has.
    AddLearner {
        /// Node id.
        id: u64,
        /// Its client address, HOST:PORT.
        addr: String,
    },
    /// Makes learner ID a voter.
    Promote {
        /// Node id.
        id: u64,
    },
    /// Removes member ID from the group.
    Remove {
        /// Node id.
        id: u64,
    },
}

pub async fn cluster(client: Client, cmd: ClusterCmd) -> anyhow::Result<()> {
    let c = Cluster::new(client);
    match cmd {
        ClusterCmd::Status { json } => {
            let (nodes, failed) = c.status().await;
            if nodes.is_empty() && !failed.is_empty() {
                let why: Vec<String> = failed
                    .iter()
                    .map(|f| format!("{}: {}", f.address, f.error))
                    .collect();
                bail!("no member answered: {}", why.join("; "));
            }
            if json {
                for n in &nodes {
                    out::line(
                        json!({"node_id": n.node_id, "address": n.address, "role": n.role,
                        "term": n.term, "last_applied": n.last_applied, "lag": n.lag}),
                    )?;
                }
                for f in &failed {
                    out::line(json!({"node_id": f.node_id, "address": f.address,
                        "role": "unreachable", "error": f.error.to_string()}))?;
                }
                return Ok(());
            }
            let mut rows = vec![
                ["node_id", "address", "role", "term", "last_applied", "lag"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<String>>(),
            ];
            for n in &nodes {
                rows.push(vec![
                    n.node_id.to_string(),
                    n.address.clone(),
                    n.role.clone(),
                    n.term.to_string(),
                    n.last_applied.to_string(),
                    n.lag.map_or("-".into(), |l| l.to_string()),
                ]);
            }
            for f in &failed {
                rows.push(vec![
                    f.node_id.map_or("?".into(), |i| i.to_string()),
                    f.address.clone(),
                    "unreachable".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
            }
            out::line(out::table(&rows).trim_end())?;
        }
        ClusterCmd::AddLearner { id, addr } => {
            c.add_learner(id, &addr).await?;
            out::line(format!("node {id} ({addr}) added as a learner"))?;
        }
        ClusterCmd::Promote { id } => {
            c.promote(id).await?;
            out::line(format!("node {id} is a voter"))?;
        }
        ClusterCmd::Remove { id } => {
            c.remove(id).await?;
            out::line(format!("node {id} removed"))?;
        }
    }
    Ok(())
}
