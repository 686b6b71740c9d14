//! Room templates (`socketio.rooms`): `{role}`, `{role}_{tournamentId}`, …
//!
//! `{role}` and `{sub}` come only from the token. Any other placeholder takes
//! the JWT claim of that name and, only when the token has no such claim, the
//! request parameter, so a client can never pick its own role or identity.
//! A template whose placeholder has no usable value is skipped, never
//! rendered half-way.

use serde_json::{Map, Value};

use crate::auth::Identity;
use crate::hub::Filter;

/// Longest value a placeholder may take (room names stay short).
const MAX_VALUE: usize = 128;

/// Validates a template at configuration time.
pub fn check_template(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 200 {
        return Err("a template must be 1-200 bytes".into());
    }
    let mut rest = t;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err("`}` without `{`".into());
        }
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or("`{` without `}`")?;
        let name = &after[..close];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`{{{name}}}` is not a placeholder (letters, digits, _)"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

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
pub fn render(t: &str, who: &Identity, params: &Map<String, Value>) -> Option<String> {
    let mut out = String::with_capacity(t.len() + 16);
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}')?;
        out.push_str(&lookup(&after[..close], who, params)?);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    match Filter::parse(&out) {
        Ok(f) if !f.is_wildcard() => Some(out),
        _ => None,
    }
}

/// The rooms a socket joins: every template that renders, without repeats,
/// in template order.
pub fn rooms_for(templates: &[String], who: &Identity, params: &Map<String, Value>) -> Vec<String> {
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

    fn defaults() -> Vec<String> {
        vec!["{role}".into(), "{role}_{tournamentId}".into()]
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
        let t = vec!["u_{sub}".to_string()];
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

    #[test]
    fn templates_are_checked() {
        assert!(check_template("{role}_{tournamentId}").is_ok());
        assert!(check_template("plain").is_ok());
        for bad in ["", "{", "}", "{}", "{a-b}", "x{role"] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
    }
}
