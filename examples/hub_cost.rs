//! The publish path of one node without sockets, on one thread, for
//! counting instructions: `clients` `/ws` outboxes subscribed to one topic,
//! `messages` publishes of the bench's fan-out payload in batches of
//! `batch`, each outbox taking and framing what it got after every batch,
//! as a connection's writer does. With `on`, `history.topics` covers the
//! topic. Nothing is written to a socket, so what it counts is the hub,
//! the history, the rings, the outboxes and the encoding.
//!
//! ```sh
//! cargo build --release --example hub_cost
//! valgrind --tool=callgrind target/release/examples/hub_cost on 2000 1000
//! ```
//!
//! Run it with two message counts and divide the difference by the extra
//! deliveries: what is left is the cost of one delivery (see
//! docs/history.md, "What it costs").

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use pulso::hub::{Filter, Hub, Message, payload_of};
use pulso::metrics::Metrics;
use pulso::transport::outbox::Outbox;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: hub_cost on|off CLIENTS MESSAGES [BATCH]";
    let history = match args.first().map(String::as_str) {
        Some("on") => true,
        Some("off") => false,
        _ => return Err(usage.into()),
    };
    let number = |i: usize, default: Option<usize>| -> Result<usize, Box<dyn std::error::Error>> {
        match args.get(i) {
            Some(s) => Ok(s.parse()?),
            None => default.ok_or_else(|| usage.into()),
        }
    };
    let (clients, messages, batch) = (number(1, None)?, number(2, None)?, number(3, Some(32))?);

    let metrics = Arc::new(Metrics::new());
    let mut hub = Hub::new(metrics.clone()).with_ring_capacity(1024);
    if history {
        hub = hub.with_history(
            vec![Filter::parse("bench/#")?],
            100,
            Duration::from_secs(300),
        );
    }
    let topic = Filter::parse("bench/t0")?;
    let outboxes: Vec<Arc<Outbox>> = (0..clients)
        .map(|_| {
            let outbox = Arc::new(Outbox::new(
                1024,
                metrics.clone(),
                &pulso::ws::protocol::JSON,
            ));
            let id = hub.register(outbox.clone());
            hub.subscribe(id, &topic, 100).map(|_| outbox)
        })
        .collect::<Result<_, _>>()?;

    let pad = "x".repeat(64);
    let name: Arc<str> = Arc::from("bench/t0");
    let mut taken = VecDeque::new();
    let (mut delivered, mut bytes) = (0u64, 0u64);
    let mut seq = 0;
    while seq < messages {
        for _ in 0..batch.min(messages - seq) {
            let payload = payload_of(&serde_json::json!({
                "seq": seq, "k": 0, "sent": 1_795_322_940_123_456_789u64, "pad": pad,
            }));
            hub.publish(Message::new(name.clone(), None, payload));
            seq += 1;
        }
        for outbox in &outboxes {
            if outbox.take(&mut taken, Waker::noop()).is_some() {
                return Err("a reader lagged".into());
            }
            for item in taken.drain(..) {
                bytes += item.bytes().len() as u64;
                delivered += 1;
            }
        }
    }
    println!(
        "history={history} clients={clients} messages={messages} delivered={delivered} bytes={bytes}"
    );
    Ok(())
}
