//! `halfmq tx`: half messages, check-back answers, pending transactions and
//! operator resolution.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use halfmq_client::{
    Admin, Client, EndSource, MessageView, TransactionProducer, TransactionResolution,
};
use serde_json::json;

use crate::{duration, out, resolution, MessageArgs};

#[derive(Debug, Subcommand)]
pub enum TxCmd {
    /// Sends half messages and resolves them as --local says. Prints each
    /// half as soon as it is acknowledged (JSON: message_id, transaction_id,
    /// topic, local, duplicate).
    Send {
        #[command(flatten)]
        msg: MessageArgs,
        /// Producer group.
        #[arg(long)]
        group: String,
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
    /// line (transaction_id, message_id, topic, check_times: 1 for a half's
    /// first check-back).
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
    /// Unresolved half messages, given-up ones included, each with a note
    /// saying why it is pending and what comes next.
    Pending {
        /// JSON lines: transaction_id, message_id, topic, producer_group,
        /// age_ms, check_times (check-backs sent so far), given_up, note.
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

fn check_line(v: &MessageView) -> String {
    json!({"transaction_id": v.transaction_id, "message_id": v.message_id, "topic": v.topic, "check_times": v.check_times})
        .to_string()
}

pub async fn run(client: Client, cmd: TxCmd) -> anyhow::Result<()> {
    match cmd {
        TxCmd::Send {
            msg,
            group,
            local,
            answer,
            wait_for,
            json,
        } => {
            let template = msg.message()?;
            let producer =
                TransactionProducer::new(client.clone(), group, move |v: MessageView| async move {
                    eprintln!(
                        "check-back {} of transaction {}: answering {answer:?}",
                        v.check_times, v.transaction_id
                    );
                    answer
                });
            let mut sent = Vec::new();
            for i in 0..msg.count {
                let tx = producer.send_half(msg.nth(&template, i)).await?;
                if json {
                    out::line(
                        json!({"message_id": tx.message_id, "transaction_id": tx.transaction_id,
                            "topic": msg.topic, "local": local, "duplicate": tx.duplicate}),
                    )?;
                } else {
                    if tx.duplicate {
                        crate::note_duplicate(&tx.message_id);
                    }
                    out::line(format!("{} {}", tx.message_id, tx.transaction_id))?;
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
                wait_resolved(&Admin::new(client), &sent, wait_for).await?;
            }
        }
        TxCmd::Checker {
            group,
            answer,
            run_for,
        } => {
            let producer =
                TransactionProducer::new(client, group, move |v: MessageView| async move {
                    // A closed stdout ends the checker at its next wait.
                    if out::line(check_line(&v)).is_err() {
                        std::process::exit(0);
                    }
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
            let listed = Admin::new(client).list_transactions().await?;
            if json {
                for t in listed {
                    out::line(
                        json!({"transaction_id": t.transaction_id, "message_id": t.message_id, "topic": t.topic,
                           "producer_group": t.producer_group, "age_ms": t.age_ms, "check_times": t.check_times,
                           "given_up": t.given_up, "note": t.note}),
                    )?;
                }
            } else if listed.is_empty() {
                eprintln!("no pending transactions");
            } else {
                for t in listed {
                    out::line(format!(
                        "{} topic={} group={} age_ms={} check_times={}{}: {}",
                        t.transaction_id,
                        t.topic,
                        t.producer_group,
                        t.age_ms,
                        t.check_times,
                        if t.given_up { " GIVEN UP" } else { "" },
                        t.note
                    ))?;
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
            out::line(format!(
                "transaction {transaction_id} {}",
                if commit { "committed" } else { "rolled back" }
            ))?;
        }
    }
    Ok(())
}

/// Waits until check-backs have resolved the `sent` halves or given them
/// up, polling the pending list; says how many of each on stderr.
async fn wait_resolved(admin: &Admin, sent: &[String], wait_for: Duration) -> anyhow::Result<()> {
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
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{left} transactions still pending after {wait_for:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
