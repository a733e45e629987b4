//! The seeds' order/cart story, with transactional messages instead of a
//! hand-made outbox table.
//!
//! - The **order service** creates the order row in its own local database
//!   (sled) inside the local transaction of `send_in_transaction`; its checker
//!   answers check-backs by looking the order up.
//! - The **cart service** consumes `order-created` and clears the cart,
//!   idempotently: it records processed message ids in its own database in
//!   the same batch as the cart change, so a redelivery changes nothing.
//!
//! Three orders: one commits normally; one whose local transaction fails
//! (no row, rolled back); one whose producer "crashes" after writing the row
//! but before EndTransaction: the broker checks back, the checker finds the
//! row, and the order event is delivered anyway.
//!
//! ```text
//! halfmq-broker --transaction-timeout 2s --check-interval 2s &   # in one terminal
//! cargo run -p halfmq-client --example order_cart -- [BROKER]
//! ```

use std::time::{Duration, Instant};

use halfmq_client::{
    Client, Consumer, Message, MessageView, TransactionProducer, TransactionResolution,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into());
    let dir = tempfile_dir()?;
    let orders_db = sled::open(dir.join("orders"))?; // the order service's own database
    let cart_db = sled::open(dir.join("cart"))?; // the cart service's own database
    for user in ["alice", "bob", "carol"] {
        cart_db.insert(format!("cart/{user}"), "3 items")?;
    }

    // Order service: the checker looks the order up in its own database.
    let lookup = orders_db.clone();
    let orders = TransactionProducer::new(
        Client::connect(&broker).await?,
        "order-service",
        move |m: MessageView| {
            let found = m
                .keys
                .first()
                .and_then(|k| lookup.get(format!("order/{k}")).ok().flatten())
                .is_some();
            println!(
                "[order] check-back for {} (check {}): order row {}",
                m.keys.join(","),
                m.check_times,
                if found {
                    "found -> commit"
                } else {
                    "missing -> rollback"
                }
            );
            std::future::ready(if found {
                TransactionResolution::Commit
            } else {
                TransactionResolution::Rollback
            })
        },
    );
    orders.wait_session(Duration::from_secs(5)).await;

    // 1. A normal order: row written in the local transaction, then commit.
    let db = orders_db.clone();
    let o1 = orders
        .send_in_transaction(
            Message::new("order-created", "alice").with_key("o-1"),
            move |_tx| async move {
                db.insert("order/o-1", "alice")?;
                db.flush_async().await?;
                Ok::<_, sled::Error>(TransactionResolution::Commit)
            },
        )
        .await?;
    println!("[order] o-1: {:?}", o1.resolution);

    // 2. The local transaction fails: no row; rolled back, never delivered.
    let o2 = orders
        .send_in_transaction(
            Message::new("order-created", "bob").with_key("o-2"),
            |_tx| async { Ok::<_, sled::Error>(TransactionResolution::Rollback) },
        )
        .await?;
    println!("[order] o-2: {:?}", o2.resolution);

    // 3. The producer "crashes" after its local commit, before EndTransaction.
    let half = orders
        .send_half(Message::new("order-created", "carol").with_key("o-3"))
        .await?;
    orders_db.insert("order/o-3", "carol")?;
    orders_db.flush()?;
    println!("[order] o-3: row written, producer crashed before EndTransaction; waiting for the check-back");
    drop(half);

    // Cart service: clear the cart once per order event.
    let cart = Consumer::new(
        Client::connect(&broker).await?,
        "cart-service",
        "order-created",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cleared = 0;
    while cleared < 2 && Instant::now() < deadline {
        for m in cart.receive(16, Duration::from_secs(2)).await? {
            let user = String::from_utf8_lossy(&m.body).into_owned();
            let done_key = format!("processed/{}", m.message_id);
            if cart_db.get(&done_key)?.is_some() {
                println!(
                    "[cart] {} seen before (redelivery); nothing to do",
                    m.message_id
                );
            } else {
                let mut batch = sled::Batch::default();
                batch.remove(format!("cart/{user}").as_bytes());
                batch.insert(done_key.as_bytes(), b"1");
                cart_db.apply_batch(batch)?;
                cart_db.flush_async().await?;
                cleared += 1;
                println!("[cart] order {} for {user}: cart cleared", m.keys.join(","));
            }
            cart.ack(&m).await?;
        }
    }
    for user in ["alice", "bob", "carol"] {
        let state = cart_db
            .get(format!("cart/{user}"))?
            .map_or("empty".to_string(), |v| {
                String::from_utf8_lossy(&v).into_owned()
            });
        println!("[cart] {user}: {state}");
    }
    if cleared < 2 {
        return Err("not every committed order reached the cart service in time".into());
    }
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("halfmq-order-cart-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
