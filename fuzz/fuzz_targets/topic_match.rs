//! Topic names, filters and matching (`topic`), and the hub's wildcard
//! index (`hub::wild`, reached through `Hub::subscribe` and `Hub::reach`).
//!
//! Names and filters are drawn from a small alphabet so that levels
//! collide. Every answer is compared with a plain reference written here:
//! which filters parse, `is_wildcard`, `matches`, `covers`, and how many
//! connections a publish reaches after subscribes and unsubscribes.
#![no_main]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pulso::hub::{Hub, Message, Reader, Recipient};
use pulso::metrics::Metrics;
use pulso::topic::{Filter, MAX_TOPIC_LEN};

#[derive(Arbitrary, Debug)]
struct Input {
    filters: Vec<Vec<u8>>,
    topics: Vec<Vec<u8>>,
    /// Connections the filters are spread over, and which to drop.
    conns: u8,
    unsubscribe: Vec<u8>,
}

const PIECES: [&str; 9] = ["a", "b", "/", "+", "#", "é", "\u{7f}", "a+", "##"];

fn text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b >= 0xF0 {
                // Now and then a long level, to cross the length limit.
                "x".repeat(usize::from(b - 0xEF) * 20)
            } else {
                PIECES[usize::from(b) % PIECES.len()].to_string()
            }
        })
        .collect()
}

fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOPIC_LEN && !s.chars().any(|c| c.is_control())
}

fn ref_filter_ok(s: &str) -> bool {
    let levels: Vec<&str> = s.split('/').collect();
    name_ok(s) && levels.iter().rev().skip(1).all(|l| *l != "#")
}

fn ref_matches(f: &[&str], t: &[&str]) -> bool {
    match (f.first(), t.first()) {
        (None, None) => true,
        (Some(&"#"), _) => true,
        (Some(&"+"), Some(_)) => ref_matches(&f[1..], &t[1..]),
        (Some(a), Some(b)) if a == b => ref_matches(&f[1..], &t[1..]),
        _ => false,
    }
}

fn ref_covers(f: &[&str], o: &[&str]) -> bool {
    match (f.first(), o.first()) {
        (None, None) => true,
        (Some(&"#"), _) => true,
        (_, Some(&"#")) => false,
        (Some(&"+"), Some(_)) => ref_covers(&f[1..], &o[1..]),
        (Some(a), Some(b)) if a == b && *b != "+" => ref_covers(&f[1..], &o[1..]),
        _ => false,
    }
}

fn levels(s: &str) -> Vec<&str> {
    s.split('/').collect()
}

struct Conn(Mutex<Reader>);

impl Recipient for Conn {
    fn reader(&self) -> &Mutex<Reader> {
        &self.0
    }
    fn deliver_batch(&self, _: Vec<Arc<Message>>) -> bool {
        true
    }
    fn flush(&self) {}
}

fuzz_target!(|input: Input| {
    let mut filters = Vec::new();
    for raw in input.filters.iter().take(64) {
        let s = text(raw);
        let parsed = Filter::parse(&s);
        assert_eq!(parsed.is_ok(), ref_filter_ok(&s), "Filter::parse({s:?})");
        if let Ok(f) = parsed {
            let wild = levels(&s).iter().any(|l| *l == "+" || *l == "#");
            assert_eq!(f.is_wildcard(), wild, "is_wildcard({s:?})");
            filters.push(f);
        }
    }
    let topics: Vec<String> = input
        .topics
        .iter()
        .take(32)
        .map(|t| text(t))
        .filter(|t| name_ok(t))
        .collect();

    for f in &filters {
        for t in &topics {
            let expected = ref_matches(&levels(f.as_str()), &levels(t));
            assert_eq!(f.matches(t), expected, "{f:?} matches {t:?}");
        }
        for o in &filters {
            let expected = ref_covers(&levels(f.as_str()), &levels(o.as_str()));
            assert_eq!(f.covers(o), expected, "{f:?} covers {o:?}");
        }
    }

    // The hub: filter i goes to connection i % n.
    let hub = Hub::new(Arc::new(Metrics::new()));
    let n = usize::from(input.conns % 8) + 1;
    let ids: Vec<u64> = (0..n)
        .map(|_| hub.register(Arc::new(Conn(Mutex::new(Reader::new(1024))))))
        .collect();
    let mut subs: Vec<HashSet<&str>> = vec![HashSet::new(); n];
    for (i, f) in filters.iter().enumerate() {
        hub.subscribe(ids[i % n], f, 1000)
            .expect("within the limit");
        subs[i % n].insert(f.as_str());
    }
    for &u in &input.unsubscribe {
        let Some(f) = filters.get(usize::from(u)) else {
            continue;
        };
        let c = usize::from(u) % n;
        let had = subs[c].remove(f.as_str());
        assert_eq!(hub.unsubscribe(ids[c], f), had, "unsubscribe {f:?}");
    }
    for t in &topics {
        let expected = subs
            .iter()
            .filter(|s| s.iter().any(|f| ref_matches(&levels(f), &levels(t))))
            .count();
        assert_eq!(hub.reach(&[Arc::from(t.as_str())]), expected, "reach {t:?}");
    }
});
