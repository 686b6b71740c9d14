//! Which filters to subscribe to on the broker.
//!
//! MQTT lets a broker send one copy of a message per matching subscription
//! when a client's filters overlap (Mosquitto 2 does exactly that). To
//! deliver every broker message once, the bridge never holds overlapping
//! subscriptions: a filter covered by another is dropped, and two filters
//! that partly overlap (`a/+/c` and `a/b/#`) are replaced by one filter
//! covering both (`a/+/#`). Each message then matches exactly one broker
//! subscription; messages the broader filter lets through but nobody asked
//! for are dropped locally (see `Subscriptions::wants`).

use std::collections::BTreeSet;

use crate::hub::topic::Filter;

/// Can some topic match both filters?
pub fn intersects(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

/// The narrowest filter (in this simple level-wise sense) covering both.
pub fn join(a: &str, b: &str) -> String {
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    let mut out: Vec<&str> = Vec::new();
    loop {
        match (x.next(), y.next()) {
            (None, None) => break,
            (Some(p), Some(q)) if p != "#" && q != "#" => out.push(if p == q { p } else { "+" }),
            // One ends or has `#` here: `#` covers the rest, parent included.
            _ => {
                out.push("#");
                break;
            }
        }
    }
    out.join("/")
}

fn covers(a: &str, b: &str) -> bool {
    match (Filter::parse(a), Filter::parse(b)) {
        (Ok(fa), Ok(fb)) => fa.covers(&fb),
        _ => false,
    }
}

/// Pairwise disjoint filters covering every wanted filter.
pub fn plan<'a>(wanted: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    let mut set: Vec<String> = wanted
        .into_iter()
        .map(str::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    'again: loop {
        for i in 0..set.len() {
            for j in 0..set.len() {
                if i == j || !intersects(&set[i], &set[j]) {
                    continue;
                }
                let merged = if covers(&set[i], &set[j]) {
                    set[i].clone()
                } else if covers(&set[j], &set[i]) {
                    set[j].clone()
                } else {
                    join(&set[i], &set[j])
                };
                let (hi, lo) = (i.max(j), i.min(j));
                set.swap_remove(hi);
                set.swap_remove(lo);
                if !set.contains(&merged) {
                    set.push(merged);
                }
                continue 'again;
            }
        }
        break;
    }
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(filters: &[&str]) -> Vec<String> {
        plan(filters.iter().copied()).into_iter().collect()
    }

    #[test]
    fn intersection() {
        assert!(intersects("a/+/c", "a/b/#"));
        assert!(intersects("a/#", "a"));
        assert!(intersects("+", "a"));
        assert!(!intersects("a/b", "a"));
        assert!(!intersects("a/+", "b/+"));
        assert!(!intersects("a/+/c", "a/b/d"));
    }

    #[test]
    fn joins_cover_both() {
        assert_eq!(join("a/+/c", "a/b/#"), "a/+/#");
        assert_eq!(join("a/b", "a/b/c"), "a/b/#");
        assert_eq!(join("a/x/c", "a/y/c"), "a/+/c");
    }

    #[test]
    fn plans_are_disjoint_and_cover_everything() {
        assert_eq!(p(&["temperature/#"]), vec!["temperature/#"]);
        assert_eq!(
            p(&[
                "temperature/#",
                "temperature/+",
                "temperature/room1",
                "temperature"
            ]),
            vec!["temperature/#"]
        );
        assert_eq!(p(&["a/+/c", "a/b/#"]), vec!["a/+/#"]);
        assert_eq!(p(&["a/1", "a/2", "b/#"]), vec!["a/1", "a/2", "b/#"]);
        assert_eq!(p(&["a/1", "a/+", "b"]), vec!["a/+", "b"]);
        assert!(p(&[]).is_empty());
        let wanted = ["s/+/t", "s/a/#", "x/+", "x/y/z", "s/b/t", "+/q"];
        let planned = p(&wanted);
        for (i, a) in planned.iter().enumerate() {
            for b in &planned[i + 1..] {
                assert!(!intersects(a, b), "{a} and {b} overlap in {planned:?}");
            }
        }
        for w in wanted {
            assert!(
                planned.iter().any(|f| covers(f, w)),
                "{w} not covered by {planned:?}"
            );
        }
    }
}
