//! Consumes a topic as a consumer group with the handler API, until Ctrl-C.
//!
//! ```text
//! cargo run -p halfmq-client --example consumer -- [BROKER] [TOPIC] [GROUP]
//! ```
//! Defaults: `127.0.0.1:8081`, `demo`, `demo-group`. Messages whose body
//! contains "fail" are retried (reconsume times grows on each redelivery).

use std::time::Duration;

use halfmq_client::{Client, ConsumeResult, Consumer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let topic = args.next().unwrap_or_else(|| "demo".into());
    let group = args.next().unwrap_or_else(|| "demo-group".into());

    let consumer = Consumer::new(Client::connect(&broker).await?, group, topic)
        .with_invisible_duration(Duration::from_secs(30));
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    consumer
        .run(
            8,
            |m| async move {
                let body = String::from_utf8_lossy(&m.body).into_owned();
                println!(
                    "{} reconsume_times={} {body}",
                    m.message_id, m.reconsume_times
                );
                if body.contains("fail") {
                    ConsumeResult::Retry {
                        delay: Some(Duration::from_secs(1)),
                        reason: "body says fail".into(),
                    }
                } else {
                    ConsumeResult::Success
                }
            },
            shutdown,
        )
        .await;
    Ok(())
}
