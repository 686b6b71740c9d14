//! The rooms a Socket.IO socket joins: its room templates (`socketio.rooms`,
//! such as `{role}_{tournamentId}`, parsed by [`crate::config::rooms`])
//! rendered with its identity and request.
//!
//! `{role}` and `{sub}` come only from the token. Any other placeholder takes
//! the JWT claim of that name and, only when the token has no such claim, the
//! request parameter, so a client can never pick its own role or identity.
//! A template whose placeholder has no usable value is skipped, never
//! rendered half-way.

use serde_json::{Map, Value};

use crate::auth::Identity;
use crate::config::rooms::{Part, RoomTemplate};
use crate::hub::Filter;

/// Longest value a placeholder may take (room names stay short).
const MAX_VALUE: usize = 128;

/// Is this a value a room name may contain? ASCII letters, digits, `_-.:`.
pub fn value_ok(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VALUE
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

/// Strings and integers as text; anything else has no value.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// The value of one placeholder, or `None` when the template must be skipped.
fn lookup(name: &str, who: &Identity, params: &Map<String, Value>) -> Option<String> {
    let text = match name {
        "role" => Some(who.role.clone()),
        "sub" => Some(who.sub.clone()),
        // A claim of that name wins, even one of an unusable type: only a
        // token without the claim lets the request parameter in.
        _ => match who.claims.get(name) {
            Some(claim) => as_text(claim),
            None => params.get(name).and_then(as_text),
        },
    }?;
    value_ok(&text).then_some(text)
}

/// Renders one template; `None` when a placeholder has no acceptable value
/// or the result is not a literal room name.
pub fn render(t: &RoomTemplate, who: &Identity, params: &Map<String, Value>) -> Option<String> {
    let mut out = String::with_capacity(t.as_str().len() + 16);
    for part in t.parts() {
        match part {
            Part::Literal(text) => out.push_str(text),
            Part::Placeholder(name) => out.push_str(&lookup(name, who, params)?),
        }
    }
    match Filter::parse(&out) {
        Ok(f) if !f.is_wildcard() => Some(out),
        _ => None,
    }
}

/// The rooms a socket joins: every template that renders, without repeats,
/// in template order.
pub fn rooms_for(
    templates: &[RoomTemplate],
    who: &Identity,
    params: &Map<String, Value>,
) -> Vec<String> {
    let mut rooms: Vec<String> = Vec::new();
    for t in templates {
        if let Some(room) = render(t, who, params)
            && !rooms.contains(&room)
        {
            rooms.push(room);
        }
    }
    rooms
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn who(role: &str, claims: Value) -> Identity {
        Identity {
            sub: "7".into(),
            role: role.into(),
            claims: claims.as_object().cloned().unwrap_or_default(),
            exp: None,
        }
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn templates(list: &[&str]) -> Vec<RoomTemplate> {
        list.iter()
            .map(|t| RoomTemplate::parse(t).unwrap())
            .collect()
    }

    fn defaults() -> Vec<RoomTemplate> {
        templates(&["{role}", "{role}_{tournamentId}"])
    }

    #[test]
    fn assistant_timer_and_tournament() {
        let none = params(json!({}));
        assert_eq!(
            rooms_for(&defaults(), &who("timer", json!({})), &none),
            ["timer"]
        );
        let p = params(json!({"tournamentId": 2}));
        assert_eq!(
            rooms_for(&defaults(), &who("assistant", json!({})), &p),
            ["assistant", "assistant_2"]
        );
        let p = params(json!({"tournamentId": "2"}));
        assert_eq!(
            rooms_for(&defaults(), &who("assistant", json!({})), &p),
            ["assistant", "assistant_2"]
        );
    }

    #[test]
    fn claim_wins_over_parameter_and_role_is_never_a_parameter() {
        let p = params(json!({"tournamentId": 3, "role": "admin", "sub": "x"}));
        let a = who("assistant", json!({"tournamentId": 9}));
        assert_eq!(rooms_for(&defaults(), &a, &p), ["assistant", "assistant_9"]);
        // A claim of an unusable type does not let the parameter in.
        let a = who("assistant", json!({"tournamentId": [1]}));
        assert_eq!(rooms_for(&defaults(), &a, &p), ["assistant"]);
        let t = templates(&["u_{sub}"]);
        assert_eq!(rooms_for(&t, &who("a", json!({})), &p), ["u_7"]);
    }

    #[test]
    fn unsafe_values_skip_the_template() {
        let a = who("assistant", json!({}));
        for bad in [
            json!("2/x"),
            json!("a b"),
            json!(""),
            json!(1.5),
            json!(true),
            json!("#"),
            json!("é"),
        ] {
            let p = params(json!({ "tournamentId": bad }));
            assert_eq!(rooms_for(&defaults(), &a, &p), ["assistant"], "{p:?}");
        }
        let p = params(json!({"tournamentId": "x".repeat(200)}));
        assert_eq!(rooms_for(&defaults(), &a, &p), ["assistant"]);
        let p = params(json!({"tournamentId": "a-b.c:d_1"}));
        assert_eq!(rooms_for(&defaults(), &a, &p)[1], "assistant_a-b.c:d_1");
    }
}
