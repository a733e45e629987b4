//! RocketMQ 5 scenarios with the official Rust client (`rocketmq` 5.0.0),
//! run by halfmq's tests/tests/rocketmq.rs against a halfmq broker.
//!
//! Usage: `scenarios ADDR SCENARIO [ARGS...]`. Each scenario prints one line
//! `RESULT <json>` and exits 0, or exits 1 with the error.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::{MessageBuilder, MessageView};
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use rocketmq::{Producer, SimpleConsumer};
use serde_json::json;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn client_option(addr: &str) -> ClientOption {
    let mut o = ClientOption::default();
    o.set_access_url(addr);
    o.set_enable_tls(false);
    if let (Ok(ak), Ok(sk)) = (std::env::var("RMQ_AK"), std::env::var("RMQ_SK")) {
        o.set_access_key(ak);
        o.set_secret_key(sk);
    }
    o
}

fn producer_option(topic: &str) -> ProducerOption {
    let mut o = ProducerOption::default();
    o.set_topics(vec![topic]);
    o
}

fn result(v: serde_json::Value) {
    println!("RESULT {v}");
}

/// The RocketMQ code in a client error's text (`code: NAME`), or the text.
fn code_of(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    match s.split("code: ").nth(1).or_else(|| s.split("code=").nth(1)) {
        Some(rest) => rest
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => s,
    }
}

async fn send(addr: &str, topic: &str, n: usize) -> Res<()> {
    let mut p = Producer::new(producer_option(topic), client_option(addr))?;
    p.start().await?;
    let mut ids = Vec::new();
    for i in 0..n {
        let m = MessageBuilder::builder()
            .set_topic(topic)
            .set_tag("rust")
            .set_keys(vec![format!("k{i}")])
            .set_body(format!("rust-{i}").into_bytes())
            .build()?;
        ids.push(p.send(m).await?.message_id().to_owned());
    }
    p.shutdown().await?;
    result(json!({ "ids": ids }));
    Ok(())
}

async fn receive(addr: &str, group: &str, topic: &str, n: usize) -> Res<()> {
    let mut o = SimpleConsumerOption::default();
    o.set_consumer_group(group);
    o.set_topics(vec![topic]);
    let mut c = SimpleConsumer::new(o, client_option(addr))?;
    c.start().await?;
    let mut bodies = Vec::new();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while bodies.len() < n && Instant::now() < deadline {
        let got = c
            .receive_with(
                topic.to_owned(),
                &FilterExpression::new(FilterType::Tag, "*"),
                16,
                Duration::from_secs(15),
            )
            .await?;
        for m in &got {
            bodies.push(String::from_utf8_lossy(m.body()).into_owned());
            ids.push(m.message_id().to_owned());
            c.ack(m).await?;
        }
    }
    c.shutdown().await?;
    result(json!({ "bodies": bodies, "ids": ids }));
    Ok(())
}

async fn tx(addr: &str, topic: &str) -> Res<()> {
    let mut p = Producer::new_transaction_producer(
        producer_option(topic),
        client_option(addr),
        Box::new(|_, _| TransactionResolution::UNKNOWN),
    )?;
    p.start().await?;
    let t = p
        .send_transaction_message(
            MessageBuilder::transaction_message_builder(topic, b"rust-commit".to_vec()).build()?,
        )
        .await?;
    t.commit().await?;
    let t = p
        .send_transaction_message(
            MessageBuilder::transaction_message_builder(topic, b"rust-rollback".to_vec())
                .build()?,
        )
        .await?;
    t.rollback().await?;
    p.shutdown().await?;
    result(json!({ "ok": true }));
    Ok(())
}

type Checked = Arc<Mutex<Vec<String>>>;

/// A checker that commits a half whose body ends in "commit", rolls back
/// the others, and records each body it was asked about in `seen`.
fn deciding_checker(seen: Checked) -> Box<rocketmq::model::transaction::TransactionChecker> {
    Box::new(move |_tid: String, m: MessageView| {
        let body = String::from_utf8_lossy(m.body()).into_owned();
        let r = if body.ends_with("commit") {
            TransactionResolution::COMMIT
        } else {
            TransactionResolution::ROLLBACK
        };
        if let Ok(mut v) = seen.lock() {
            v.push(body);
        }
        r
    })
}

/// Sends two halves and ends neither; the checker commits the one whose
/// body ends in "commit" and rolls back the other when the broker checks.
async fn orphan(addr: &str, topic: &str, wait_s: u64) -> Res<()> {
    let checked: Checked = Arc::new(Mutex::new(Vec::new()));
    let mut p = Producer::new_transaction_producer(
        producer_option(topic),
        client_option(addr),
        deciding_checker(Arc::clone(&checked)),
    )?;
    p.start().await?;
    for body in ["rust-orphan-commit", "rust-orphan-rollback"] {
        let _unended = p
            .send_transaction_message(
                MessageBuilder::transaction_message_builder(topic, body.as_bytes().to_vec())
                    .build()?,
            )
            .await?;
    }
    let v = answer_checks(p, &checked, 2, wait_s).await?;
    result(json!({ "checked": v }));
    Ok(())
}

/// Keeps `p` running until its checker answered `n` checks or `wait_s`
/// passed, then shuts it down; the bodies checked, sorted.
async fn answer_checks(p: Producer, checked: &Checked, n: usize, wait_s: u64) -> Res<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(wait_s);
    while Instant::now() < deadline && checked.lock().map(|v| v.len()).unwrap_or(0) < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.shutdown().await?;
    let mut v = checked.lock().map(|v| v.clone()).unwrap_or_default();
    v.sort();
    Ok(v)
}

/// A transactional producer of `topic` that sends nothing and answers the
/// broker's checks (commit when the body ends in "commit") until it has
/// answered `n` or `wait_s` passed.
async fn checker(addr: &str, topic: &str, n: usize, wait_s: u64) -> Res<()> {
    let checked: Checked = Arc::new(Mutex::new(Vec::new()));
    let mut p = Producer::new_transaction_producer(
        producer_option(topic),
        client_option(addr),
        deciding_checker(Arc::clone(&checked)),
    )?;
    p.start().await?;
    let v = answer_checks(p, &checked, n, wait_s).await?;
    result(json!({ "checked": v }));
    Ok(())
}

async fn delay(addr: &str, topic: &str, secs: i64) -> Res<()> {
    let mut p = Producer::new(producer_option(topic), client_option(addr))?;
    p.start().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    p.send(
        MessageBuilder::delay_message_builder(topic, b"rust-delayed".to_vec(), now + secs)
            .build()?,
    )
    .await?;
    p.shutdown().await?;
    result(json!({ "deliver_at": now + secs }));
    Ok(())
}

async fn fifo_send(addr: &str, topic: &str, groups: usize, per: usize) -> Res<()> {
    let mut p = Producer::new(producer_option(topic), client_option(addr))?;
    p.start().await?;
    for i in 0..per {
        for g in 0..groups {
            let m = MessageBuilder::fifo_message_builder(
                topic,
                format!("g{g}-{i}").into_bytes(),
                format!("g{g}"),
            )
            .build()?;
            p.send(m).await?;
        }
    }
    p.shutdown().await?;
    result(json!({ "ok": true }));
    Ok(())
}

/// Bad input: each refusal's code, then a good send still works.
async fn bad(addr: &str, topic: &str, big: usize) -> Res<()> {
    let mut p = Producer::new(producer_option(topic), client_option(addr))?;
    p.start().await?;
    let oversized = match p
        .send(
            MessageBuilder::builder()
                .set_topic(topic)
                .set_body(vec![b'x'; big])
                .build()?,
        )
        .await
    {
        Ok(_) => "accepted".to_owned(),
        Err(e) => code_of(&e),
    };
    p.send(
        MessageBuilder::builder()
            .set_topic(topic)
            .set_body(b"after-bad".to_vec())
            .build()?,
    )
    .await?;
    p.shutdown().await?;
    let mut bad_topic = Producer::new(producer_option("%reserved"), client_option(addr))?;
    let bad_topic = match bad_topic.start().await {
        Ok(()) => "accepted".to_owned(),
        Err(e) => code_of(&e),
    };
    result(json!({ "oversized": oversized, "bad_topic": bad_topic }));
    Ok(())
}

/// One producer start and send; the outcome: "ok" or the refusal's code.
async fn try_send(addr: &str, topic: &str) -> Res<()> {
    let r: Result<(), rocketmq::error::ClientError> = async {
        let mut p = Producer::new(producer_option(topic), client_option(addr))?;
        p.start().await?;
        p.send(
            MessageBuilder::builder()
                .set_topic(topic)
                .set_body(b"try".to_vec())
                .build()?,
        )
        .await?;
        p.shutdown().await?;
        Ok(())
    }
    .await;
    let outcome = match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => code_of(&e),
    };
    result(json!({ "outcome": outcome }));
    Ok(())
}

/// Closed-loop load: `conc` tasks each sending (or, `tx`, sending a half
/// and committing it) one message of `size` bytes at a time for `secs`
/// after 2 s of warm-up; ops/s and latency percentiles.
async fn bench(
    addr: &str,
    topic: &str,
    mode: &str,
    secs: u64,
    conc: usize,
    size: usize,
) -> Res<()> {
    let tx = mode == "tx";
    let mut p = if tx {
        Producer::new_transaction_producer(
            producer_option(topic),
            client_option(addr),
            Box::new(|_, _| TransactionResolution::COMMIT),
        )?
    } else {
        Producer::new(producer_option(topic), client_option(addr))?
    };
    p.start().await?;
    let p = Arc::new(p);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(2);
    let end = measure_from + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let p = Arc::clone(&p);
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let body = vec![b'x'; size];
            while Instant::now() < end {
                let t0 = Instant::now();
                let ok = if tx {
                    match p
                        .send_transaction_message(
                            MessageBuilder::transaction_message_builder(&topic, body.clone())
                                .build()
                                .expect("message"),
                        )
                        .await
                    {
                        Ok(t) => t.commit().await.is_ok(),
                        Err(_) => false,
                    }
                } else {
                    let m = MessageBuilder::builder()
                        .set_topic(&topic)
                        .set_body(body.clone())
                        .build()
                        .expect("message");
                    p.send(m).await.is_ok()
                };
                if ok && t0 >= measure_from && Instant::now() <= end {
                    lat.push(t0.elapsed().as_micros() as u64);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    all.sort_unstable();
    let pct = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    result(json!({
        "ops_per_s": all.len() as f64 / secs as f64,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "ops": all.len(),
    }));
    std::process::exit(0);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize| arg(i).parse::<u64>().unwrap_or(0);
    let addr = arg(1);
    let r = match arg(2).as_str() {
        "send" => send(&addr, &arg(3), num(4) as usize).await,
        "receive" => receive(&addr, &arg(3), &arg(4), num(5) as usize).await,
        "tx" => tx(&addr, &arg(3)).await,
        "orphan" => orphan(&addr, &arg(3), num(4)).await,
        "delay" => delay(&addr, &arg(3), num(4) as i64).await,
        "fifo-send" => fifo_send(&addr, &arg(3), num(4) as usize, num(5) as usize).await,
        "bad" => bad(&addr, &arg(3), num(4) as usize).await,
        "try-send" => try_send(&addr, &arg(3)).await,
        "bench" => {
            bench(
                &addr,
                &arg(3),
                &arg(4),
                num(5),
                num(6) as usize,
                num(7) as usize,
            )
            .await
        }
        "checker" => checker(&addr, &arg(3), num(4) as usize, num(5)).await,
        other => Err(format!("unknown scenario {other:?}").into()),
    };
    if let Err(e) = r {
        eprintln!("scenario failed: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}
