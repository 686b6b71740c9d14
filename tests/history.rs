//! History and recovery on `/ws` (SPEC §11), on one node: offsets and
//! epochs on the messages of `history.topics`, and `sub` with `since`
//! after a connection was cut.

mod common;

use common::{TestServer, WsClient};
use serde_json::{Value, json};

/// A server keeping `size` messages per topic of `h/#`.
async fn server(size: usize) -> TestServer {
    let extra = format!("[history]\ntopics = [\"h/#\"]\nsize = {size}\n");
    TestServer::start_toml(&extra).await
}

/// The next published message (skipping replies).
async fn message(ws: &mut WsClient) -> Value {
    loop {
        let m = ws.recv().await;
        if m.get("topic").is_some() {
            return m;
        }
    }
}

#[tokio::test]
async fn tracked_topics_carry_offset_and_epoch_and_others_nothing() {
    let srv = server(100).await;
    let mut ws = srv.ws("assistant", "h1").await;
    ws.sub("h/1").await;
    ws.sub("other").await;
    for n in 1..=3 {
        srv.publish("h/1", json!(n)).await;
    }
    srv.publish("other", json!("x")).await;
    let mut epoch = None;
    for n in 1..=3u64 {
        let m = message(&mut ws).await;
        assert_eq!(
            (m["payload"].clone(), m["offset"].clone()),
            (json!(n), json!(n))
        );
        let e = m["epoch"].as_str().expect("an epoch").to_string();
        assert!(epoch.get_or_insert(e.clone()) == &e, "one epoch per topic");
    }
    let m = message(&mut ws).await;
    assert_eq!(m["topic"], "other");
    assert!(m.get("offset").is_none() && m.get("epoch").is_none(), "{m}");
}

#[tokio::test]
async fn a_client_whose_connection_was_cut_gets_what_it_missed_then_live_messages() {
    let srv = server(100).await;
    let mut ws = srv.ws("assistant", "cut").await;
    ws.sub("h/feed").await;
    srv.publish("h/feed", json!(0)).await;
    let first = message(&mut ws).await;
    let (offset, epoch) = (first["offset"].as_u64().unwrap(), first["epoch"].clone());
    // The TCP connection is cut: no close frame.
    drop(ws);
    for n in 1..=50 {
        srv.publish("h/feed", json!(n)).await;
    }
    let mut back = srv.ws("assistant", "cut").await;
    back.send(
        json!({"type":"sub","topic":"h/feed","since":{"offset":offset,"epoch":epoch},"id":"r"}),
    )
    .await;
    let ack = back.recv().await;
    assert_eq!(ack, json!({"type":"ack","id":"r","recovered":true}));
    for n in 1..=50 {
        let m = message(&mut back).await;
        assert_eq!(
            (m["payload"].clone(), m["offset"].clone()),
            (json!(n), json!(offset + n))
        );
    }
    srv.publish("h/feed", json!("live")).await;
    let m = message(&mut back).await;
    assert_eq!(
        (m["payload"].clone(), m["offset"].clone()),
        (json!("live"), json!(offset + 51))
    );
    assert!(
        srv.metrics()
            .await
            .contains("pulso_recoveries_total{outcome=\"recovered\"} 1")
    );
}

#[tokio::test]
async fn without_every_missed_message_the_client_is_told_to_reload() {
    let srv = server(5).await;
    let mut ws = srv.ws("assistant", "gap").await;
    ws.sub("h/g").await;
    srv.publish("h/g", json!(0)).await;
    let first = message(&mut ws).await;
    let epoch = first["epoch"].clone();
    for n in 1..=10 {
        srv.publish("h/g", json!(n)).await;
    }
    let reload = |since: Value| json!({"type":"sub","topic":"h/g","since":since,"id":1});
    // Offsets 2..=6 are gone (size 5), another epoch, an offset never given,
    // and a topic without history: recovered false, nothing replayed, live
    // messages follow.
    for since in [
        json!({"offset": 1, "epoch": epoch}),
        json!({"offset": 9, "epoch": "another"}),
        json!({"offset": 99, "epoch": epoch}),
    ] {
        let mut c = srv.ws("assistant", "gap2").await;
        c.send(reload(since)).await;
        assert_eq!(
            c.recv().await,
            json!({"type":"ack","id":1,"recovered":false})
        );
        srv.publish("h/g", json!("next")).await;
        assert_eq!(message(&mut c).await["payload"], "next");
    }
    let mut c = srv.ws("assistant", "gap3").await;
    c.send(json!({"type":"sub","topic":"plain","since":{"offset":1,"epoch":"e"},"id":2}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type":"ack","id":2,"recovered":false})
    );

    // A wildcard with `since` is refused and subscribes nothing.
    c.send(json!({"type":"sub","topic":"h/+","since":{"offset":1,"epoch":"e"},"id":3}))
        .await;
    let err = c.recv().await;
    assert_eq!(
        (err["type"].clone(), err["code"].clone()),
        (json!("error"), json!("bad_request"))
    );
    c.sub("marker").await;
    srv.publish("h/x", json!("not for c")).await;
    srv.publish("marker", json!("m")).await;
    assert_eq!(message(&mut c).await["payload"], "m");
}

#[tokio::test]
async fn no_gap_and_no_duplicate_at_the_seam_while_publishing() {
    let srv = server(1000).await;
    let mut first = srv.ws("assistant", "seam").await;
    first.sub("h/s").await;
    srv.publish("h/s", json!(0)).await;
    let m = message(&mut first).await;
    let (base, epoch) = (m["offset"].as_u64().unwrap(), m["epoch"].clone());
    let total = 400u64;
    let publisher = {
        let url = srv.url("/api/publish");
        let admin = srv.token("admin", "p");
        tokio::spawn(async move {
            for n in 1..=total {
                let body = json!({"topic":"h/s","payload":n}).to_string();
                common::post_json(&url, Some(&admin), &body).await;
            }
        })
    };
    // Subscribe with `since` while the publisher runs.
    let mut c = srv.ws("assistant", "seam2").await;
    c.send(json!({"type":"sub","topic":"h/s","since":{"offset":base,"epoch":epoch},"id":1}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type":"ack","id":1,"recovered":true})
    );
    let mut offsets = Vec::new();
    while offsets.last() != Some(&(base + total)) {
        offsets.push(message(&mut c).await["offset"].as_u64().unwrap());
    }
    let want: Vec<u64> = (base + 1..=base + total).collect();
    assert_eq!(offsets, want, "every offset once, in order");
    publisher.await.unwrap();
}
