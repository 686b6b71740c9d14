//! Per-topic history (SPEC §11): the last messages of every topic that
//! `history.topics` matches, each with an offset (per topic, +1 per
//! message) and the topic's epoch, so a client that lost its connection can
//! ask for what it missed.
//!
//! The history lives in this node's memory: its epoch is new at every
//! start (a restarted node has lost its history, and a client that asks with
//! an older epoch is told so). It is bounded three ways: `history.size`
//! messages per topic, `history.ttl` per message, and [`MAX_TOPICS`]
//! topics (the least recently published topic is dropped first; a topic
//! that comes back starts a new epoch, since its offsets start again).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Filter, Message};

/// Topics with a history at once, at most.
pub const MAX_TOPICS: usize = 10_000;

/// Where a message sits in its topic's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// What a client that comes back asks for: the messages after `offset` of
/// the history whose epoch is `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub offset: u64,
    pub epoch: String,
}

/// One topic's history.
struct Stream {
    epoch: Arc<str>,
    /// The offset the next message gets.
    next: u64,
    entries: VecDeque<(Instant, Arc<Message>)>,
    bytes: usize,
    last_used: u64,
}

pub struct History {
    filters: Vec<Filter>,
    size: usize,
    ttl: Duration,
    /// This process's part of every epoch.
    node_epoch: String,
    streams: HashMap<Arc<str>, Stream>,
    /// Streams created so far (a part of each new stream's epoch).
    generation: u64,
    /// A clock for least-recently-used eviction.
    tick: u64,
    /// What all streams hold, kept up to date (read on every publish for
    /// the metrics, so never summed over the streams).
    held: Held,
}

/// Sizes, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub messages: usize,
    pub bytes: usize,
}

impl History {
    pub fn new(filters: Vec<Filter>, size: usize, ttl: Duration) -> History {
        History {
            filters,
            size: size.max(1),
            ttl,
            node_epoch: crate::hub::random_id(),
            streams: HashMap::new(),
            generation: 0,
            tick: 0,
            held: Held::default(),
        }
    }

    /// Whether `topic` keeps a history.
    pub fn tracks(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    /// The position the next message of `topic` takes (the caller makes the
    /// message with it, then [`History::record`]s it).
    pub fn next_position(&mut self, topic: &Arc<str>) -> Position {
        let now = Instant::now();
        self.tick += 1;
        let tick = self.tick;
        if !self.streams.contains_key(topic) {
            if self.streams.len() >= MAX_TOPICS {
                self.evict_one();
            }
            self.generation += 1;
            let epoch: Arc<str> = Arc::from(format!("{}-{}", self.node_epoch, self.generation));
            self.streams.insert(
                topic.clone(),
                Stream {
                    epoch,
                    next: 1,
                    entries: VecDeque::new(),
                    bytes: 0,
                    last_used: tick,
                },
            );
        }
        let (size, ttl) = (self.size, self.ttl);
        match self.streams.get_mut(topic) {
            Some(s) => {
                self.held.less(s.trim(size, ttl, now));
                s.last_used = tick;
                Position {
                    offset: s.next,
                    epoch: s.epoch.clone(),
                }
            }
            None => Position {
                offset: 0,
                epoch: Arc::from(""),
            },
        }
    }

    /// Keeps `msg` (made with the position [`History::next_position`] gave).
    pub fn record(&mut self, msg: &Arc<Message>) {
        let Some(pos) = &msg.position else { return };
        let (size, ttl) = (self.size, self.ttl);
        if let Some(s) = self.streams.get_mut(&msg.topic)
            && s.epoch == pos.epoch
        {
            s.next = pos.offset + 1;
            let bytes = weight(msg);
            s.bytes += bytes;
            s.entries.push_back((Instant::now(), msg.clone()));
            self.held.messages += 1;
            self.held.bytes += bytes;
            self.held.less(s.trim(size, ttl, Instant::now()));
        }
    }

    /// The messages of `topic` after `since`, if the history still holds
    /// every one of them (`None` otherwise: another epoch, a gap, or an
    /// offset this history never gave).
    pub fn since(&mut self, topic: &str, since: &Since) -> Option<Vec<Arc<Message>>> {
        let (size, ttl) = (self.size, self.ttl);
        let s = self.streams.get_mut(topic)?;
        self.held.less(s.trim(size, ttl, Instant::now()));
        if *s.epoch != *since.epoch || since.offset >= s.next {
            return None;
        }
        let first = s
            .entries
            .front()
            .and_then(|(_, m)| m.position.as_ref())
            .map_or(s.next, |p| p.offset);
        if since.offset + 1 < first {
            return None;
        }
        Some(
            s.entries
                .iter()
                .filter(|(_, m)| m.position.as_ref().is_some_and(|p| p.offset > since.offset))
                .map(|(_, m)| m.clone())
                .collect(),
        )
    }

    pub fn held(&self) -> Held {
        self.held
    }

    fn evict_one(&mut self) {
        if let Some(oldest) = self
            .streams
            .iter()
            .min_by_key(|(_, s)| s.last_used)
            .map(|(k, _)| k.clone())
            && let Some(s) = self.streams.remove(&oldest)
        {
            self.held.less(Held {
                messages: s.entries.len(),
                bytes: s.bytes,
            });
        }
    }
}

/// What a message weighs in the history (its text; the rest is shared).
fn weight(msg: &Message) -> usize {
    msg.payload.get().len() + msg.topic.len()
}

impl Held {
    fn less(&mut self, gone: Held) {
        self.messages = self.messages.saturating_sub(gone.messages);
        self.bytes = self.bytes.saturating_sub(gone.bytes);
    }
}

impl Stream {
    /// Drops what is past `size` or `ttl`; returns what it dropped.
    fn trim(&mut self, size: usize, ttl: Duration, now: Instant) -> Held {
        let mut gone = Held::default();
        while self.entries.len() > size
            || self
                .entries
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) >= ttl)
        {
            if let Some((_, m)) = self.entries.pop_front() {
                let bytes = weight(&m);
                self.bytes = self.bytes.saturating_sub(bytes);
                gone.messages += 1;
                gone.bytes += bytes;
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;

    fn publish(h: &mut History, topic: &str, n: i64) -> Arc<Message> {
        let topic: Arc<str> = Arc::from(topic);
        let pos = h.next_position(&topic);
        let mut m = Message::new(topic, None, payload_of(&n));
        m.position = Some(pos);
        let m = Arc::new(m);
        h.record(&m);
        m
    }

    fn offsets(msgs: &[Arc<Message>]) -> Vec<u64> {
        msgs.iter()
            .filter_map(|m| m.position.as_ref().map(|p| p.offset))
            .collect()
    }

    #[test]
    fn offsets_count_per_topic_and_recovery_needs_every_missed_message() {
        let mut h = History::new(
            vec![Filter::parse("t/#").unwrap()],
            3,
            Duration::from_secs(60),
        );
        assert!(h.tracks("t/a") && !h.tracks("u"));
        for n in 1..=5 {
            publish(&mut h, "t/a", n);
        }
        let other = publish(&mut h, "t/b", 1);
        assert_eq!(other.position.as_ref().map(|p| p.offset), Some(1));
        let epoch = h.streams["t/a" as &str].epoch.to_string();
        let at = |offset| Since {
            offset,
            epoch: epoch.clone(),
        };
        // Size 3 holds offsets 3, 4, 5.
        assert_eq!(
            h.since("t/a", &at(2)).map(|m| offsets(&m)),
            Some(vec![3, 4, 5])
        );
        assert_eq!(h.since("t/a", &at(4)).map(|m| offsets(&m)), Some(vec![5]));
        assert_eq!(h.since("t/a", &at(5)).map(|m| offsets(&m)), Some(vec![]));
        // Offset 2 is gone: a gap. An offset never given, another epoch.
        assert!(h.since("t/a", &at(1)).is_none());
        assert!(h.since("t/a", &at(6)).is_none());
        assert!(
            h.since(
                "t/a",
                &Since {
                    offset: 4,
                    epoch: "other".into()
                }
            )
            .is_none()
        );
        assert_eq!(h.held().messages, 4);
    }

    #[test]
    fn old_messages_expire_and_topics_are_bounded() {
        let mut h = History::new(vec![Filter::parse("#").unwrap()], 10, Duration::ZERO);
        publish(&mut h, "a", 1);
        let epoch = h.streams["a" as &str].epoch.to_string();
        assert!(
            h.since("a", &Since { offset: 0, epoch }).is_none(),
            "expired"
        );
        let mut h = History::new(
            vec![Filter::parse("#").unwrap()],
            1,
            Duration::from_secs(60),
        );
        for n in 0..(MAX_TOPICS + 5) {
            publish(&mut h, &format!("t{n}"), 1);
        }
        assert_eq!(h.streams.len(), MAX_TOPICS);
        assert!(
            !h.streams.contains_key("t0"),
            "least recently used goes first"
        );
    }
}
