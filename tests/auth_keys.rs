//! JWT with public keys (RS256, ES256, EdDSA) from PEM files, end to end.

mod common;

use common::*;
use pulso::auth::Signer;
use serde_json::json;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn rs256_es256_eddsa_tokens_connect() {
    for (public, private) in [
        ("rsa_public.pem", "rsa_private.pem"),
        ("ec_public.pem", "ec_private.pem"),
        ("ed_public.pem", "ed_private.pem"),
    ] {
        let srv = TestServer::start_toml(&format!(
            "[jwt]\npublic_key_file = \"{}\"\n",
            fixture(public)
        ))
        .await;
        let pem = std::fs::read(fixture(private)).unwrap();
        let signer = Signer::private_pem(&pem).unwrap();
        let t = signer
            .token(
                "assistant",
                "k",
                Some(std::time::Duration::from_secs(60)),
                &Default::default(),
            )
            .unwrap();
        let mut c = WsClient::connect(&srv.ws_url(&t)).await;
        assert_eq!(
            c.request(json!({"type":"ping"}), 1).await["type"],
            "pong",
            "{public}"
        );
        // The HMAC secret still works alongside the public key.
        let mut h = srv.ws("assistant", "h").await;
        assert_eq!(h.request(json!({"type":"ping"}), 1).await["type"], "pong");
        // A token signed by another key of the same kind is refused.
        let other = Signer::private_pem(
            &std::fs::read(fixture(if private.starts_with("rsa") {
                "ec_private.pem"
            } else {
                "rsa_private.pem"
            }))
            .unwrap(),
        )
        .unwrap();
        let bad = other
            .token("assistant", "k", None, &Default::default())
            .unwrap();
        assert!(
            tokio_tungstenite::connect_async(srv.ws_url(&bad))
                .await
                .is_err()
        );
        srv.stop().await;
    }
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_at_the_handshake() {
    let srv = TestServer::start_toml(
        "[jwt]\nissuer = \"onsite\"\naudience = \"pulso\"\nrequire_exp = true\n",
    )
    .await;
    let good = token_claims(
        json!({"sub":"1","role":"timer","iss":"onsite","aud":"pulso","exp": 4_000_000_000u64}),
    );
    let mut c = WsClient::connect(&srv.ws_url(&good)).await;
    assert_eq!(c.request(json!({"type":"ping"}), 1).await["type"], "pong");
    for bad in [
        json!({"sub":"1","role":"timer","iss":"other","aud":"pulso","exp": 4_000_000_000u64}),
        json!({"sub":"1","role":"timer","iss":"onsite","aud":"else","exp": 4_000_000_000u64}),
        json!({"sub":"1","role":"timer","iss":"onsite","aud":"pulso"}),
    ] {
        let t = token_claims(bad.clone());
        assert!(
            tokio_tungstenite::connect_async(srv.ws_url(&t))
                .await
                .is_err(),
            "{bad}"
        );
    }
    srv.stop().await;
}
