//! An axum application that embeds pulso: its own routes (`GET /hello`,
//! `POST /orders`) next to pulso's (`/ws`, `/socket.io/`, `/api/…`) on one
//! port, a ticker that publishes the time on `clock` every second from
//! Rust code, and `POST /orders` that publishes each order on `orders`.
//!
//! ```sh
//! PULSO_JWT_SECRET=change-me cargo run --example embed
//! TOKEN=$(cargo run -q -- token --jwt-secret change-me --role assistant --sub me)
//! cargo run --example subscribe -- "$TOKEN" clock orders    # PULSO_URL=ws://127.0.0.1:3000/ws
//! curl -d '{"item":"tea"}' -H 'content-type: application/json' 127.0.0.1:3000/orders
//! ```
//!
//! `tests/embed.rs` builds this same application (it includes this file)
//! and drives it with real clients.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

/// The application's router, with pulso's endpoints merged in, and the
/// pulso server behind them, prepared but not yet running.
pub async fn app(settings: pulso::Builder) -> Result<(Router, pulso::Server), pulso::StartError> {
    let server = settings.without_listener().build().await?;
    let own = Router::new()
        .route("/hello", get(hello))
        .route("/orders", post(order))
        .with_state(server.handle());
    Ok((own.merge(server.router()), server))
}

async fn hello() -> &'static str {
    "hello from the application\n"
}

/// Takes an order and tells every subscriber of `orders`.
async fn order(State(pulso): State<pulso::Handle>, Json(order): Json<Value>) -> Json<Value> {
    match pulso.broadcast(&["orders"], Some("order"), &order) {
        Ok(reached) => Json(json!({"accepted": true, "reached": reached})),
        Err(e) => Json(json!({"accepted": false, "error": e.to_string()})),
    }
}

/// Publishes `{"tick": n}` on `clock` every `period`, until pulso stops.
pub async fn ticker(pulso: pulso::Handle, period: Duration) {
    let mut interval = tokio::time::interval(period);
    let stopping = pulso.stopping();
    tokio::pin!(stopping);
    for tick in 0u64.. {
        tokio::select! {
            _ = &mut stopping => return,
            _ = interval.tick() => {
                if let Err(e) = pulso.publish("clock", &json!({"tick": tick})) {
                    eprintln!("clock: {e}");
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut settings = pulso::Server::builder()
        .database_url("sqlite::memory:")
        .demo(false);
    // Without a secret pulso makes one up for this run.
    if let Ok(secret) = std::env::var("PULSO_JWT_SECRET") {
        settings = settings.jwt_secret(secret);
    }
    let (app, server) = app(settings).await?;
    if let Some(tokens) = server.sample_tokens() {
        println!("a client token: {}", tokens.client);
    }
    let pulso = server.handle();
    tokio::spawn(ticker(pulso.clone(), Duration::from_secs(1)));
    let running = tokio::spawn(server.run());
    let stop = pulso.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.shutdown();
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(pulso.stopping())
    .await?;
    running.await??;
    Ok(())
}
