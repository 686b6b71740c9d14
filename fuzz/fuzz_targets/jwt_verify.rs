//! JWT verification (`auth::Verifier`) with a fixed HMAC key.
//!
//! Three ways in, none may panic: any token text; a token whose header and
//! claims segments are arbitrary bytes, correctly signed with the key (so
//! header and claims handling is reached); and a claims object signed by
//! `auth::Signer`. A token accepted gives an identity whose claims are the
//! ones signed, and a token signed with another key is never accepted.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use pulso::auth::{Signer, Verifier};
use pulso::config::JwtConfig;
use serde_json::{Map, Value};
use sha2::Sha256;

const SECRET: &str = "fuzz-secret-0123456789abcdef";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    token: &'a str,
    header: &'a [u8],
    claims: &'a [u8],
    require_exp: bool,
    other_key: bool,
}

fn hs256(header: &[u8], claims: &[u8], secret: &str) -> String {
    let signing = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(signing.as_bytes());
    format!(
        "{signing}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fuzz_target!(|input: Input<'_>| {
    let cfg = JwtConfig {
        secret: Some(SECRET.into()),
        public_key_file: None,
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(30),
        require_exp: input.require_exp,
    };
    let verifier = Verifier::new(&cfg, Some(SECRET)).expect("an HMAC verifier");
    let _ = verifier.verify(input.token);

    let secret = if input.other_key {
        "another-secret"
    } else {
        SECRET
    };
    let token = hs256(input.header, input.claims, secret);
    if let Ok(who) = verifier.verify(&token) {
        assert!(!input.other_key, "accepted a token signed with another key");
        let claims: Map<String, Value> =
            serde_json::from_slice(input.claims).expect("accepted claims are a JSON object");
        assert_eq!(who.claims, claims);
        let _ = verifier.deadline(&who);
    }

    if let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(input.claims) {
        let signer = Signer::hmac(secret);
        if let Ok(token) = signer.sign(&claims)
            && let Ok(who) = verifier.verify(&token)
        {
            assert!(!input.other_key, "accepted a token signed with another key");
            assert_eq!(who.claims, claims);
        }
    }
});
