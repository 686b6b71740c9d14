//! Topic names and subscription filters (MQTT-style `+` and `#`).
//!
//! Published names are always literal. In a filter, a level that is exactly
//! `+` matches one level and a final level that is exactly `#` matches the rest,
//! including the parent (`a/#` matches `a`). `+`/`#` inside a longer level are
//! literal, so a Socket.IO room such as `/notifications#Ab3` is a plain name.
//!
//! A leaf: it uses nothing else of the crate, so the configuration can
//! check topics and ACL filters when it is loaded without depending on the
//! hub, which re-exports it as `hub::topic`.

use std::fmt;
use std::sync::Arc;

pub const MAX_TOPIC_LEN: usize = 256;

/// Checks a topic name: 1–256 bytes of UTF-8 without control characters.
pub fn validate_name(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("topic is empty");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err("topic is longer than 256 bytes");
    }
    if topic.chars().any(|c| c <= '\u{1f}' || c == '\u{7f}') {
        return Err("topic contains a control character");
    }
    Ok(())
}

/// A parsed subscription filter.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    text: Arc<str>,
    wildcard: bool,
}

impl Filter {
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        validate_name(text)?;
        let mut wildcard = false;
        let mut levels = text.split('/').peekable();
        while let Some(level) = levels.next() {
            match level {
                "#" if levels.peek().is_some() => {
                    return Err("`#` is only allowed as the last level");
                }
                "#" | "+" => wildcard = true,
                _ => {}
            }
        }
        Ok(Filter {
            text: text.into(),
            wildcard,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn text(&self) -> &Arc<str> {
        &self.text
    }

    /// True when the filter has `+` or `#` levels (and so is not one exact name).
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Does this filter match the published topic name?
    pub fn matches(&self, topic: &str) -> bool {
        if !self.wildcard {
            return &*self.text == topic;
        }
        // Level by level, on bytes (`/` is never inside a UTF-8 sequence):
        // this runs for every publish on a topic that history or a wildcard
        // subscription may cover.
        let (mut f, mut t) = (self.text.as_bytes(), topic.as_bytes());
        loop {
            let (level, f_rest) = split_level(f);
            if level == b"#" {
                return true;
            }
            let (t_level, t_rest) = split_level(t);
            if level != b"+" && level != t_level {
                return false;
            }
            match (f_rest, t_rest) {
                (None, None) => return true,
                (Some(fr), Some(tr)) => (f, t) = (fr, tr),
                // `a/#` matches `a`.
                (Some(fr), None) => return split_level(fr).0 == b"#",
                (None, Some(_)) => return false,
            }
        }
    }

    /// Does every topic `other` matches also match `self`? Used by the ACL to
    /// decide whether a (possibly wildcard) subscription is within a rule.
    pub fn covers(&self, other: &Filter) -> bool {
        let mut f = self.text.split('/');
        let mut o = other.text.split('/');
        loop {
            match (f.next(), o.next()) {
                (Some("#"), _) => return true,
                (_, Some("#")) => return false,
                (Some("+"), Some(_)) => {}
                (Some(fl), Some(ol)) if fl == ol => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

/// The first level of `s`, and what follows its `/` if there is one.
fn split_level(s: &[u8]) -> (&[u8], Option<&[u8]>) {
    match s.iter().position(|&b| b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({:?})", &*self.text)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap()
    }

    #[test]
    fn names() {
        assert!(validate_name("a/b").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(256)).is_ok());
        assert!(validate_name(&"x".repeat(257)).is_err());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name("a\u{7f}").is_err());
        assert!(validate_name("temperatura/señal").is_ok());
    }

    #[test]
    fn parse_rejects_inner_hash() {
        assert!(Filter::parse("a/#/b").is_err());
        assert!(Filter::parse("#/b").is_err());
        assert!(f("a/#").is_wildcard());
        assert!(f("+").is_wildcard());
        assert!(!f("/notifications#Ab3").is_wildcard());
        assert!(!f("a+/b#").is_wildcard());
    }

    #[test]
    fn matching() {
        assert!(f("a/#").matches("a"));
        assert!(f("a/#").matches("a/b/c"));
        assert!(!f("a/#").matches("ab"));
        assert!(f("#").matches("anything/at/all"));
        assert!(f("a/+/c").matches("a/b/c"));
        assert!(f("a/+/c").matches("a//c"));
        assert!(!f("a/+/c").matches("a/b/c/d"));
        assert!(!f("a/+").matches("a"));
        assert!(f("/notifications#Ab3").matches("/notifications#Ab3"));
        assert!(!f("a+").matches("ab"));
    }

    /// Level by level with `str::split`, the definition `matches` follows.
    fn matches_by_split(filter: &str, topic: &str) -> bool {
        let mut f = filter.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(fl), Some(tl)) if fl == tl => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn matching_agrees_with_splitting_into_levels() {
        // Every filter of up to 4 characters over these, on every topic of
        // up to 4 characters without wildcards.
        let strings = |alphabet: &[char]| {
            let mut all = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..4 {
                last = last
                    .iter()
                    .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                    .collect();
                all.extend(last.iter().cloned());
            }
            all
        };
        let filters: Vec<Filter> = strings(&['a', 'b', '/', '+', '#', 'ñ'])
            .iter()
            .filter_map(|s| Filter::parse(s).ok())
            .collect();
        let topics = strings(&['a', 'b', '/', 'ñ']);
        let mut checked = 0;
        for filter in &filters {
            for topic in &topics {
                assert_eq!(
                    filter.matches(topic),
                    matches_by_split(filter.as_str(), topic),
                    "{filter:?} on {topic:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn coverage() {
        assert!(f("#").covers(&f("a/+/b")));
        assert!(f("a/#").covers(&f("a/b/#")));
        assert!(f("a/#").covers(&f("a")));
        assert!(!f("a/b/#").covers(&f("a/#")));
        assert!(f("a/+").covers(&f("a/x")));
        assert!(f("a/+").covers(&f("a/+")));
        assert!(!f("a/x").covers(&f("a/+")));
        assert!(!f("a/+").covers(&f("a/#")));
        assert!(!f("a").covers(&f("a/b")));
    }
}
