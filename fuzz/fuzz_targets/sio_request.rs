//! Sails virtual requests (`sio::request`) and room templates
//! (`config::rooms`, rendered by `sio::rooms`).
//!
//! Any JSON value is read as a request without a panic; an accepted one
//! has a path starting with `/` without a query, and its token is the
//! `jwt-api-key` parameter. Any text is parsed as a template; a parsed one
//! puts its parts back together into the same text. Templates are rendered
//! with an identity and the request's parameters: every room is a literal
//! (non-wildcard) valid name, without repeats.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pulso::auth::Identity;
use pulso::config::rooms::{Part, RoomTemplate};
use pulso::sio::request::{TOKEN_KEY, Token, parse};
use pulso::sio::rooms::rooms_for;
use pulso::topic::Filter;
use serde_json::{Map, Value};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    request: &'a str,
    templates: Vec<&'a str>,
    claims: &'a str,
}

fuzz_target!(|input: Input<'_>| {
    let params = match serde_json::from_str::<Value>(input.request) {
        Ok(v) => match parse(&v) {
            Ok(req) => {
                assert!(req.path.starts_with('/'), "path {:?}", req.path);
                assert!(!req.path.contains('?'));
                match (&req.token, req.params.get(TOKEN_KEY)) {
                    (Token::Text(t), Some(Value::String(s))) => assert_eq!(t, s),
                    (Token::Text(_), other) => panic!("token from {other:?}"),
                    _ => {}
                }
                req.params
            }
            Err(f) => {
                assert!((400..500).contains(&f.status));
                let _ = f.ack();
                Map::new()
            }
        },
        Err(_) => Map::new(),
    };

    let mut templates = Vec::new();
    for t in input.templates.iter().take(16) {
        let Ok(template) = RoomTemplate::parse(t) else {
            continue;
        };
        let rebuilt: String = template
            .parts()
            .iter()
            .map(|p| match p {
                Part::Literal(s) => {
                    assert!(!s.is_empty() && !s.contains(['{', '}']));
                    s.clone()
                }
                Part::Placeholder(n) => format!("{{{n}}}"),
            })
            .collect();
        assert_eq!(&rebuilt, t);
        templates.push(template);
    }

    let claims = match serde_json::from_str::<Value>(input.claims) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let who = Identity {
        sub: claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("u1")
            .to_string(),
        role: claims
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user")
            .to_string(),
        claims,
        exp: None,
    };
    let rooms = rooms_for(&templates, &who, &params);
    for (i, room) in rooms.iter().enumerate() {
        let f = Filter::parse(room).unwrap_or_else(|e| panic!("room {room:?}: {e}"));
        assert!(!f.is_wildcard(), "wildcard room {room:?}");
        assert!(!rooms[..i].contains(room), "room {room:?} twice");
    }
});
