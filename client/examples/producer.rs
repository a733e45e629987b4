//! Sends messages to a topic and prints their ids.
//!
//! ```text
//! cargo run -p halfmq-client --example producer -- [BROKER] [TOPIC] [COUNT]
//! ```
//! Defaults: `127.0.0.1:8081`, `demo`, 10.

use halfmq_client::{Client, Message, Producer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let topic = args.next().unwrap_or_else(|| "demo".into());
    let count: usize = args.next().map_or(Ok(10), |s| s.parse())?;

    let producer = Producer::new(Client::connect(&broker).await?);
    // Concurrent sends are coalesced into batch requests (auto-batch).
    let sends = (0..count).map(|i| {
        let msg = Message::new(topic.clone(), format!("message {i}"))
            .with_tag(if i % 2 == 0 { "even" } else { "odd" })
            .with_key(format!("key-{i}"));
        producer.send(msg)
    });
    for receipt in futures_join_all(sends).await {
        let r = receipt?;
        println!(
            "{} -> queue {} offset {}",
            r.message_id,
            r.queue_id,
            r.queue_offset.unwrap_or_default() // no delay: always an offset
        );
    }
    Ok(())
}

/// Awaits every future, keeping order (a tiny join_all without another crate).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}
