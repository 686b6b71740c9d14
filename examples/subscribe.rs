//! Subscribe to topics on a running pulso and print what arrives.
//!
//! ```sh
//! cargo run --example subscribe -- "$TOKEN" metricas/demo 'sensors/#'
//! PULSO_URL=ws://host:1337/ws cargo run --example subscribe -- "$TOKEN" temperature
//! ```

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let token = args.next().ok_or("usage: subscribe TOKEN [TOPIC…]")?;
    let base = std::env::var("PULSO_URL").unwrap_or_else(|_| "ws://127.0.0.1:1337/ws".into());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{base}?token={token}")).await?;
    for (i, topic) in args.enumerate() {
        let sub = serde_json::json!({"type": "sub", "topic": topic, "id": i});
        ws.send(Message::text(sub.to_string())).await?;
    }
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(text) => println!("{text}"),
            Message::Close(frame) => {
                println!("closed: {frame:?}");
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
