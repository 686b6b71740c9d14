//! The demo feed: `{"value": sin(t) + noise}` on `demo.topic` every
//! `demo.interval`, so a fresh install has something to show.

use std::sync::Arc;

use crate::gateway::Gateway;
use crate::hub::{Message, payload_of};

pub async fn run(gw: Arc<Gateway>) {
    let cfg = gw.config.demo.clone();
    let topic: Arc<str> = Arc::from(cfg.topic.as_str());
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let t = started.elapsed().as_secs_f64();
        let noise = (rand::random::<f64>() - 0.5) * 0.2;
        let value = ((t.sin() + noise) * 1000.0).round() / 1000.0;
        gw.metrics.published_from("demo");
        gw.hub.publish_local(Message::new(
            topic.clone(),
            None,
            payload_of(&serde_json::json!({ "value": value })),
        ));
    }
}
