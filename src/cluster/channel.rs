//! Names on the backplane: one channel (Redis) or subject (NATS) per
//! concrete topic or room, and the engine's pattern for each wildcard
//! filter, so that a node hears only what its own clients want.
//!
//! Redis: the channel of topic `t` is `<prefix>:{t}`. The braces are a
//! hash tag: with Redis Cluster's sharded pub/sub every channel of a topic
//! maps to the slot of its name, so sharding can be switched on later
//! without renaming anything. A wildcard filter becomes a glob pattern in
//! which `+` and a final `#` are `*`; Redis's `*` also crosses `/`, so a
//! pattern may match more than the filter, and the receiving node matches
//! every message again against its own subscriptions (the hub does).
//!
//! NATS: the subject of topic `a/b` is `<prefix>.t.a.b`, one token per
//! level. A token may not be empty nor hold `.`, `*`, `>` or whitespace,
//! so every byte outside `[A-Za-z0-9_-]` is written `~HH` (hex) and an
//! empty level is `~`; the mapping is one-to-one. `+` is NATS's `*` (one
//! token) and a final `#` is `>` plus the parent subject itself (MQTT's
//! `a/#` matches `a`; NATS's `a.>` does not). Nodes publish on the same
//! name under `<prefix>.in` instead of `<prefix>.t`, for the backplane's
//! stream to put them in one order (see `nats`).

use crate::hub::Filter;

/// The Redis channel of a concrete topic or room.
pub fn redis_channel(prefix: &str, topic: &str) -> String {
    format!("{prefix}:{{{topic}}}")
}

/// Redis subscriptions for `filter`: channels (exact names) and glob
/// patterns, which together match at least every topic the filter does.
pub fn redis_subscriptions(prefix: &str, filter: &Filter) -> (Vec<String>, Vec<String>) {
    let text = filter.as_str();
    if !filter.is_wildcard() {
        return (vec![redis_channel(prefix, text)], Vec::new());
    }
    let (mut channels, mut patterns) = (Vec::new(), Vec::new());
    // `a/#` also matches `a` itself.
    if let Some(parent) = text.strip_suffix("/#") {
        match Filter::parse(parent) {
            Ok(p) if !p.is_wildcard() => channels.push(redis_channel(prefix, parent)),
            _ => patterns.push(redis_glob(prefix, parent)),
        }
    }
    patterns.push(redis_glob(prefix, text));
    (channels, patterns)
}

/// The glob pattern of a filter: `+` and `#` levels are `*`.
fn redis_glob(prefix: &str, filter: &str) -> String {
    let levels: Vec<String> = filter
        .split('/')
        .map(|level| match level {
            "+" | "#" => "*".to_string(),
            literal => glob_escape(literal),
        })
        .collect();
    format!("{}:{{{}}}", glob_escape(prefix), levels.join("/"))
}

/// A literal inside a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The NATS subject on which a concrete topic or room is delivered.
pub fn nats_subject(prefix: &str, topic: &str) -> String {
    topic_subject(prefix, "t", topic)
}

/// The NATS subject on which a node publishes to a topic or room: the
/// backplane's stream takes it in, numbers it, and delivers it again on
/// [`nats_subject`] (see `nats`).
pub fn nats_ingest_subject(prefix: &str, topic: &str) -> String {
    topic_subject(prefix, "in", topic)
}

pub(crate) fn topic_subject(prefix: &str, kind: &str, topic: &str) -> String {
    let mut out = format!("{prefix}.{kind}");
    for level in topic.split('/') {
        out.push('.');
        push_token(&mut out, level);
    }
    out
}

/// NATS subjects for `filter`, which together match exactly the topics
/// the filter does.
pub fn nats_subjects(prefix: &str, filter: &Filter) -> Vec<String> {
    let levels: Vec<&str> = filter.as_str().split('/').collect();
    let mut subject = format!("{prefix}.t");
    let mut out = Vec::new();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        match *level {
            "+" => subject.push_str(".*"),
            "#" if last => {
                if i > 0 {
                    out.push(subject.clone());
                }
                subject.push_str(".>");
            }
            literal => {
                subject.push('.');
                push_token(&mut subject, literal);
            }
        }
    }
    out.push(subject);
    out
}

fn push_token(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('~');
        return;
    }
    for b in level.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap()
    }

    #[test]
    fn redis_names() {
        assert_eq!(redis_channel("p", "a/b"), "p:{a/b}");
        assert_eq!(
            redis_subscriptions("p", &f("a/b")),
            (vec!["p:{a/b}".to_string()], vec![])
        );
        assert_eq!(
            redis_subscriptions("p", &f("a/+/c")),
            (vec![], vec!["p:{a/*/c}".to_string()])
        );
        assert_eq!(
            redis_subscriptions("p", &f("a/#")),
            (vec!["p:{a}".to_string()], vec!["p:{a/*}".to_string()])
        );
        assert_eq!(
            redis_subscriptions("p", &f("#")),
            (vec![], vec!["p:{*}".to_string()])
        );
        assert_eq!(
            redis_subscriptions("p", &f("+/#")),
            (vec![], vec!["p:{*}".to_string(), "p:{*/*}".to_string()])
        );
        // Glob characters in a literal level are escaped.
        assert_eq!(
            redis_subscriptions("p", &f("a*[x]?/+")),
            (vec![], vec!["p:{a\\*\\[x\\]\\?/*}".to_string()])
        );
    }

    #[test]
    fn nats_names() {
        assert_eq!(nats_subject("p", "a/b"), "p.t.a.b");
        assert_eq!(nats_ingest_subject("p", "a/b"), "p.in.a.b");
        assert_eq!(nats_subject("p", "a.b c/*/>"), "p.t.a~2Eb~20c.~2A.~3E");
        assert_eq!(nats_subject("p", "a//b"), "p.t.a.~.b");
        assert_eq!(nats_subject("p", "~"), "p.t.~7E");
        assert_eq!(
            nats_subject("p", "/notifications#Ab3"),
            "p.t.~.notifications~23Ab3"
        );
        assert_eq!(nats_subjects("p", &f("a/+/c")), ["p.t.a.*.c"]);
        assert_eq!(nats_subjects("p", &f("a/#")), ["p.t.a", "p.t.a.>"]);
        assert_eq!(nats_subjects("p", &f("#")), ["p.t.>"]);
        assert_eq!(nats_subjects("p", &f("x/y")), ["p.t.x.y"]);
    }

    #[test]
    fn nats_subjects_are_one_to_one() {
        let topics = [
            "a", "a/b", "a.b", "a~2Eb", "a/", "/a", "a//b", "~", "A", "a b",
        ];
        let mut seen = std::collections::HashSet::new();
        for t in topics {
            assert!(seen.insert(nats_subject("p", t)), "{t}");
        }
    }
}
