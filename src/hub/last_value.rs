//! The last message of each tracked topic, like an MQTT retained message, so
//! a new subscriber sees the current value without waiting for the next one.
//!
//! Which topics are tracked is a list of filters (the MQTT bridge's
//! `mqtt.topics` with its prefix). Any publish on a tracked topic updates it,
//! whatever its source. Memory is bounded: at most `max_topics` topics and
//! `max_bytes` of topic names and payloads, the least recently updated topic
//! evicted first. A message larger than `max_bytes` on its own is not kept
//! (and its topic's older value is forgotten, being outdated).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Message;
use super::topic::Filter;

pub struct LastValues {
    filters: Vec<Filter>,
    max_topics: usize,
    max_bytes: usize,
    /// Topic and payload bytes held.
    bytes: usize,
    /// Topic → (message, update stamp).
    latest: HashMap<Arc<str>, (Arc<Message>, u64)>,
    /// Update stamp → topic: the first entry is the least recently updated.
    by_age: BTreeMap<u64, Arc<str>>,
    next_stamp: u64,
}

impl LastValues {
    pub fn new(filters: Vec<Filter>, max_topics: usize, max_bytes: usize) -> Self {
        LastValues {
            filters,
            max_topics: max_topics.max(1),
            max_bytes,
            bytes: 0,
            latest: HashMap::new(),
            by_age: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// Whether messages on `topic` are kept.
    pub fn tracks(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    /// Keeps `msg` as its topic's last value if the topic is tracked.
    /// Returns the number of topics held.
    pub fn record(&mut self, msg: &Arc<Message>) -> usize {
        if !self.tracks(&msg.topic) {
            return self.latest.len();
        }
        if size_of(msg) > self.max_bytes {
            // Too big to keep; the previous value is outdated, so it goes.
            if let Some((old, old_stamp)) = self.latest.remove(&msg.topic) {
                self.by_age.remove(&old_stamp);
                self.bytes -= size_of(&old);
            }
            return self.latest.len();
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some((old, old_stamp)) = self.latest.insert(msg.topic.clone(), (msg.clone(), stamp))
        {
            self.by_age.remove(&old_stamp);
            self.bytes -= size_of(&old);
        }
        self.bytes += size_of(msg);
        self.by_age.insert(stamp, msg.topic.clone());
        while self.latest.len() > self.max_topics || self.bytes > self.max_bytes {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((gone, _)) = self.latest.remove(&oldest) {
                self.bytes -= size_of(&gone);
            }
        }
        self.latest.len()
    }

    /// The last values of every topic `filter` matches, oldest update first
    /// (so a client sees them in the order they happened).
    pub fn matching(&self, filter: &Filter) -> Vec<Arc<Message>> {
        if !filter.is_wildcard() {
            return self
                .latest
                .get(filter.as_str())
                .map(|(m, _)| vec![m.clone()])
                .unwrap_or_default();
        }
        let mut found: Vec<(u64, Arc<Message>)> = self
            .latest
            .values()
            .filter(|(m, _)| filter.matches(&m.topic))
            .map(|(m, stamp)| (*stamp, m.clone()))
            .collect();
        found.sort_by_key(|(stamp, _)| *stamp);
        found.into_iter().map(|(_, m)| m).collect()
    }

    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}

/// What a kept message costs, for the byte budget.
fn size_of(msg: &Message) -> usize {
    msg.topic.len() + msg.payload.get().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap()
    }

    fn msg(topic: &str, value: i64, ts: u64) -> Arc<Message> {
        Arc::new(Message::with_ts(topic.into(), None, payload_of(&value), ts))
    }

    fn values(v: &[Arc<Message>]) -> Vec<(String, String, u64)> {
        v.iter()
            .map(|m| (m.topic.to_string(), m.payload.get().to_string(), m.ts))
            .collect()
    }

    #[test]
    fn keeps_latest_per_tracked_topic_with_original_ts() {
        let mut lv = LastValues::new(vec![f("temperature/#")], 10, 1 << 20);
        lv.record(&msg("temperature/a", 1, 100));
        lv.record(&msg("temperature/a", 2, 200));
        lv.record(&msg("humidity", 3, 300));
        assert_eq!(lv.len(), 1);
        assert_eq!(
            values(&lv.matching(&f("temperature/a"))),
            vec![("temperature/a".into(), "2".into(), 200)]
        );
        assert!(lv.matching(&f("humidity")).is_empty());
        assert!(lv.tracks("temperature"), "a/# covers a");
    }

    #[test]
    fn wildcards_get_every_match_in_update_order() {
        let mut lv = LastValues::new(vec![f("#")], 10, 1 << 20);
        lv.record(&msg("s/b/t", 1, 1));
        lv.record(&msg("s/a/t", 2, 2));
        lv.record(&msg("s/a/h", 3, 3));
        lv.record(&msg("s/b/t", 4, 4));
        assert_eq!(
            values(&lv.matching(&f("s/+/t"))),
            vec![
                ("s/a/t".into(), "2".into(), 2),
                ("s/b/t".into(), "4".into(), 4)
            ]
        );
        assert_eq!(lv.matching(&f("s/#")).len(), 3);
        assert!(lv.matching(&f("x/#")).is_empty());
    }

    #[test]
    fn evicts_least_recently_updated() {
        let mut lv = LastValues::new(vec![f("#")], 2, 1 << 20);
        lv.record(&msg("a", 1, 1));
        lv.record(&msg("b", 2, 2));
        lv.record(&msg("a", 3, 3)); // a is now newer than b
        assert_eq!(lv.record(&msg("c", 4, 4)), 2);
        assert!(lv.matching(&f("b")).is_empty(), "b was the oldest");
        assert_eq!(lv.matching(&f("a")).len(), 1);
        assert_eq!(lv.matching(&f("c")).len(), 1);
        assert_eq!(lv.by_age.len(), 2, "no stale stamps left behind");
    }

    #[test]
    fn evicts_to_stay_within_the_byte_budget() {
        // Each message costs 1 (topic) + 1 (payload digit) = 2 bytes.
        let mut lv = LastValues::new(vec![f("#")], 100, 5);
        lv.record(&msg("a", 1, 1));
        lv.record(&msg("b", 2, 2));
        assert_eq!(lv.bytes, 4);
        lv.record(&msg("c", 3, 3));
        assert_eq!((lv.len(), lv.bytes), (2, 4), "a went");
        assert!(lv.matching(&f("a")).is_empty());
        // Replacing a value adjusts the count instead of adding to it.
        lv.record(&msg("c", 4, 4));
        assert_eq!((lv.len(), lv.bytes), (2, 4));
        // Too big alone: not kept, others stay, its own older value goes.
        lv.record(&msg("b", 123456, 5));
        assert_eq!((lv.len(), lv.bytes), (1, 2));
        assert_eq!(lv.matching(&f("c")).len(), 1);
    }

    #[test]
    fn nothing_tracked_without_filters() {
        let mut lv = LastValues::new(vec![], 10, 1 << 20);
        assert_eq!(lv.record(&msg("a", 1, 1)), 0);
        assert!(lv.is_empty());
    }
}
