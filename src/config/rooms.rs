//! Room templates (`socketio.rooms`): `{role}`, `{role}_{tournamentId}`, …
//!
//! Parsed once, when the configuration is loaded, so a typo is a start-up
//! error naming the setting. What a placeholder's value is (a token claim
//! or a request parameter) is the Socket.IO front end's business when it
//! renders a template for a socket; only the syntax lives here.

use std::fmt;

/// Longest template, in bytes.
const MAX_LEN: usize = 200;

/// One piece of a [`RoomTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as is; never contains `{` or `}`.
    Literal(String),
    /// `{name}`: ASCII letters, digits and `_`.
    Placeholder(String),
}

/// A checked template: literal text and `{name}` placeholders, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomTemplate {
    text: String,
    parts: Vec<Part>,
}

impl RoomTemplate {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(t: &str) -> Result<Self, String> {
        if t.is_empty() || t.len() > MAX_LEN {
            return Err("a template must be 1-200 bytes".into());
        }
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err("`}` without `{`".into());
            }
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or("`{` without `}`")?;
            let name = &after[..close];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`{{{name}}}` is not a placeholder (letters, digits, _)"
                ));
            }
            parts.push(Part::Placeholder(name.to_string()));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(RoomTemplate {
            text: t.to_string(),
            parts,
        })
    }

    /// The template as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }
}

impl fmt::Display for RoomTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq<str> for RoomTemplate {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for RoomTemplate {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Part {
        Part::Literal(s.into())
    }

    fn ph(s: &str) -> Part {
        Part::Placeholder(s.into())
    }

    #[test]
    fn templates_are_parsed() {
        let t = RoomTemplate::parse("{role}_{tournamentId}").unwrap();
        assert_eq!(t.parts(), [ph("role"), lit("_"), ph("tournamentId")]);
        assert_eq!(t.as_str(), "{role}_{tournamentId}");
        assert_eq!(
            RoomTemplate::parse("plain").unwrap().parts(),
            [lit("plain")]
        );
        let t = RoomTemplate::parse("u-{sub}.x").unwrap();
        assert_eq!(t.parts(), [lit("u-"), ph("sub"), lit(".x")]);
    }

    #[test]
    fn templates_are_checked() {
        for bad in ["", "{", "}", "{}", "{a-b}", "x{role", "a}b", "{a{b}"] {
            assert!(RoomTemplate::parse(bad).is_err(), "{bad}");
        }
        assert!(RoomTemplate::parse(&"x".repeat(200)).is_ok());
        assert!(RoomTemplate::parse(&"x".repeat(201)).is_err());
    }
}
