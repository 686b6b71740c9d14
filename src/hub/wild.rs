//! Wildcard subscriptions, indexed by their first level.
//!
//! A publish tests only the filters that can match its topic: those whose
//! first level is the topic's first level, and those starting with `+` or
//! `#`. Per-entity filters such as `sensors/<id>/+` or `user/<id>/#` then
//! cost a publish nothing unless they share its first level.

use std::collections::HashMap;
use std::sync::Arc;

use super::{ConnId, Filter, Recipient, Subscribers};

#[derive(Default)]
pub(super) struct WildTable {
    filters: HashMap<Arc<str>, (Filter, Subscribers)>,
    /// First level (literal) → filters starting with it.
    by_first: HashMap<Box<str>, Vec<Arc<str>>>,
    /// Filters whose first level is `+` or `#`.
    any_first: Vec<Arc<str>>,
}

fn first_level(s: &str) -> &str {
    s.split('/').next().unwrap_or(s)
}

impl WildTable {
    pub(super) fn len(&self) -> usize {
        self.filters.len()
    }

    pub(super) fn filters(&self) -> impl Iterator<Item = &Filter> {
        self.filters.values().map(|(f, _)| f)
    }

    /// Every wildcard filter with its number of subscribers.
    pub(super) fn counts(&self) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.filters
            .iter()
            .map(|(text, (_, subs))| (text, subs.len()))
    }

    /// The subscribers of `filter`, added to the index if it is new.
    pub(super) fn subscribers(&mut self, filter: &Filter) -> &mut Subscribers {
        &mut self
            .filters
            .entry(filter.text().clone())
            .or_insert_with(|| {
                let first = first_level(filter.as_str());
                if first == "+" || first == "#" {
                    self.any_first.push(filter.text().clone());
                } else {
                    self.by_first
                        .entry(first.into())
                        .or_default()
                        .push(filter.text().clone());
                }
                (filter.clone(), Subscribers::default())
            })
            .1
    }

    /// Removes a subscriber; true when the filter has none left (and is gone).
    pub(super) fn remove(
        &mut self,
        filter: &Filter,
        conn: ConnId,
        recipient: &Arc<dyn Recipient>,
        flush: bool,
    ) -> bool {
        let Some((_, subs)) = self.filters.get_mut(filter.as_str()) else {
            return false;
        };
        if !subs.remove(conn, recipient, flush) {
            return false;
        }
        self.filters.remove(filter.as_str());
        let first = first_level(filter.as_str());
        let bucket = if first == "+" || first == "#" {
            Some(&mut self.any_first)
        } else {
            self.by_first.get_mut(first)
        };
        if let Some(bucket) = bucket {
            bucket.retain(|t| **t != *filter.as_str());
            if bucket.is_empty() && first != "+" && first != "#" {
                self.by_first.remove(first);
            }
        }
        true
    }

    /// The subscribers of every filter that matches `topic`.
    pub(super) fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a Subscribers> {
        self.by_first
            .get(first_level(topic))
            .into_iter()
            .flatten()
            .chain(&self.any_first)
            .filter_map(|text| self.filters.get(text))
            .filter(move |(f, _)| f.matches(topic))
            .map(|(_, subs)| subs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Message, Recipient};

    #[derive(Default)]
    struct Nobody(std::sync::Mutex<crate::hub::Reader>);
    impl Recipient for Nobody {
        fn reader(&self) -> &std::sync::Mutex<crate::hub::Reader> {
            &self.0
        }
        fn deliver_batch(&self, _: Vec<Arc<Message>>) -> bool {
            true
        }
        fn flush(&self) {}
    }

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap()
    }

    fn matches(t: &WildTable, topic: &str) -> Vec<ConnId> {
        let mut v: Vec<ConnId> = t
            .matching(topic)
            .flat_map(|s| s.readers.iter().copied())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn only_filters_that_can_match_are_tested_and_the_index_empties() {
        let mut t = WildTable::default();
        let filters = ["a/#", "a/+/c", "b/+", "+/c", "#"];
        let nobody: Arc<dyn Recipient> = Arc::new(Nobody::default());
        for (i, s) in filters.iter().enumerate() {
            assert!(t.subscribers(&f(s)).add(i as ConnId, &nobody, 8));
        }
        assert!(
            !t.subscribers(&f("a/#")).add(9, &nobody, 8),
            "not the first subscriber"
        );
        assert_eq!(matches(&t, "a"), vec![0, 4, 9]);
        assert_eq!(matches(&t, "a/b/c"), vec![0, 1, 4, 9]);
        assert_eq!(matches(&t, "x/c"), vec![3, 4]);
        assert_eq!(matches(&t, "b/c"), vec![2, 3, 4]);
        assert!(!t.remove(&f("a/#"), 0, &nobody, false), "9 still holds it");
        for (i, s) in filters.iter().enumerate() {
            assert!(t.remove(&f(s), i as ConnId, &nobody, false) || *s == "a/#");
        }
        assert!(t.remove(&f("a/#"), 9, &nobody, false));
        assert_eq!(t.len(), 0);
        assert!(t.by_first.is_empty() && t.any_first.is_empty());
        assert!(matches(&t, "a/b/c").is_empty());
    }
}
