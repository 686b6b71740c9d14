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
//!
//! Besides its per-topic offset, every publish that reaches a tracked topic
//! gets a node-global sequence number ([`Seq`]), taken under the same lock
//! as the offsets, so it orders the publishes of all topics together: a
//! Socket.IO client remembers only the last offset it saw, whatever room
//! it came from, and [`History::missed`] answers "everything of these
//! topics after that one". Each stream remembers the highest sequence it
//! has dropped and the sequence at which it was created, and the history
//! the highest sequence of any stream it evicted, so it can tell whether
//! it still holds *every* message after a given sequence.

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

/// A publish's place in the node-global order of every tracked publish:
/// `n` grows by one per publish (all the copies of a publish to several
/// rooms share it), and `epoch` is this process's, so a number from
/// another process (or node) is never taken for one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq {
    pub epoch: Arc<str>,
    pub n: u64,
}

/// What a client that comes back asks for: the messages after `offset` of
/// the history whose epoch is `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub offset: u64,
    pub epoch: String,
}

/// A kept message and when it was published, on this node's clock.
type Entry = (Instant, Arc<Message>);

/// One topic's history.
struct Stream {
    epoch: Arc<str>,
    /// The offset the next message gets.
    next: u64,
    entries: VecDeque<(Instant, Arc<Message>)>,
    bytes: usize,
    last_used: u64,
    /// The global sequence when the stream was created: the topic's
    /// publishes after it are all here, or were dropped.
    created: u64,
    /// The highest global sequence of a message dropped from this stream
    /// (0: none): a client whose last one is older has lost some.
    dropped: u64,
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
    /// The last global sequence given ([`Seq`]).
    seq: u64,
    /// This process's epoch as a shared string, for every [`Seq`].
    seq_epoch: Arc<str>,
    /// The newest global sequence of a message in a stream that was
    /// evicted (0: none), so a client whose last sequence is at least this
    /// lost nothing to an eviction.
    evicted: u64,
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
        let node_epoch = crate::hub::random_id();
        History {
            filters,
            size: size.max(1),
            ttl,
            seq_epoch: Arc::from(node_epoch.as_str()),
            node_epoch,
            streams: HashMap::new(),
            generation: 0,
            tick: 0,
            seq: 0,
            evicted: 0,
            held: Held::default(),
        }
    }

    /// Whether `topic` keeps a history.
    pub fn tracks(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    /// The global sequence of the next publish (once per publish, before
    /// its copies are kept with [`History::keep_new`]).
    pub fn next_seq(&mut self) -> Seq {
        self.seq += 1;
        Seq {
            epoch: self.seq_epoch.clone(),
            n: self.seq,
        }
    }

    /// This process's epoch, the one every [`Seq`] carries.
    pub fn seq_epoch(&self) -> &str {
        &self.seq_epoch
    }

    /// Gives `msg` the next position of its topic's history and keeps it
    /// (the caller took the publish's [`History::next_seq`] and set it on
    /// `msg`): one look-up of the topic's stream, one reading of the clock
    /// and one trim per message.
    pub fn keep_new(&mut self, msg: Message) -> Arc<Message> {
        let now = Instant::now();
        self.tick += 1;
        let tick = self.tick;
        let (size, ttl) = (self.size, self.ttl);
        if let Some(s) = self.streams.get_mut(&msg.topic) {
            let (msg, gone) = s.push_next(msg, tick, size, ttl, now);
            self.held.add(&msg);
            self.held.less(gone);
            return msg;
        }
        if self.streams.len() >= MAX_TOPICS {
            self.evict_one();
        }
        self.generation += 1;
        let mut s = Stream {
            epoch: Arc::from(format!("{}-{}", self.node_epoch, self.generation)),
            next: 1,
            entries: VecDeque::new(),
            bytes: 0,
            last_used: tick,
            created: self.seq.saturating_sub(1),
            dropped: 0,
        };
        let (msg, gone) = s.push_next(msg, tick, size, ttl, now);
        self.held.add(&msg);
        self.held.less(gone);
        self.streams.insert(msg.topic.clone(), s);
        msg
    }

    /// Keeps a message whose position a cluster's backplane gave (so that
    /// every node hands out the same offsets): appended when it follows
    /// the topic's stream; otherwise (another epoch, or a gap: this node
    /// did not follow the topic meanwhile) the stream starts again from it,
    /// and a client asking for what came before is sent to the backplane's
    /// copy ([`History::seed`]). False when the stream holds it already (it
    /// was fetched before it arrived): it was replayed, and is not
    /// delivered again.
    pub fn place(&mut self, msg: &Arc<Message>) -> bool {
        let Some(pos) = &msg.position else {
            return true;
        };
        self.tick += 1;
        match self.streams.get(&msg.topic) {
            Some(s) if s.epoch == pos.epoch && pos.offset < s.next => return false,
            Some(s) if s.epoch == pos.epoch && pos.offset == s.next => {}
            _ => self.restart(&msg.topic, &pos.epoch, pos.offset, Vec::new()),
        }
        if let Some(s) = self.streams.get_mut(&msg.topic) {
            s.last_used = self.tick;
        }
        self.record(msg);
        true
    }

    /// Keeps `msg` at the end of its topic's stream, if its position is of
    /// that stream's epoch.
    fn record(&mut self, msg: &Arc<Message>) {
        let Some(pos) = &msg.position else { return };
        let (size, ttl) = (self.size, self.ttl);
        if let Some(s) = self.streams.get_mut(&msg.topic)
            && s.epoch == pos.epoch
        {
            let now = Instant::now();
            s.next = pos.offset + 1;
            let bytes = weight(msg);
            s.bytes += bytes;
            s.entries.push_back((now, msg.clone()));
            self.held.messages += 1;
            self.held.bytes += bytes;
            self.held.less(s.trim(size, ttl, now));
        }
    }

    /// Joins what a cluster's backplane holds of `topic`'s history
    /// (`fetched`: its messages in offset order, `last` the last offset the
    /// backplane gave, `epoch` the topic's there) with what this node kept
    /// of the topic since it began to follow it, so that the stream holds
    /// every message from the first fetched on. Called with the topic
    /// followed (pinned) from before the fetch, so the two overlap or meet.
    pub fn seed(
        &mut self,
        topic: &Arc<str>,
        epoch: &Arc<str>,
        last: u64,
        fetched: Vec<Arc<Message>>,
    ) {
        let now = Instant::now();
        let now_ms = crate::hub::now_ms();
        let dated = |m: Arc<Message>| {
            let age = Duration::from_millis(now_ms.saturating_sub(m.ts));
            (now.checked_sub(age).unwrap_or(now), m)
        };
        let offset_of = |m: &Message| m.position.as_ref().map_or(0, |p| p.offset);
        let local = self.streams.get(topic).filter(|s| s.epoch == *epoch);
        let joined: Option<(Vec<Entry>, u64)> = match local {
            // Nothing here of this epoch: the backplane's copy. What it
            // holds and this node has not received yet arrives later, and
            // is dropped then ([`History::place`]).
            None => Some((fetched.into_iter().map(dated).collect(), last + 1)),
            Some(s) => {
                let first_local = s.entries.front().map_or(s.next, |(_, m)| offset_of(m));
                if first_local > last + 1 {
                    // Newer than the copy and not joined to it: keep ours.
                    None
                } else {
                    // The older part from the copy; this node's from its
                    // first on, and what it has yet to receive comes live.
                    let mut all: Vec<Entry> = fetched
                        .into_iter()
                        .filter(|m| offset_of(m) < first_local)
                        .map(dated)
                        .collect();
                    all.extend(s.entries.iter().cloned());
                    Some((all, s.next))
                }
            }
        };
        let Some((entries, next)) = joined else {
            return;
        };
        self.tick += 1;
        self.restart(topic, epoch, next, entries);
        let (size, ttl) = (self.size, self.ttl);
        if let Some(s) = self.streams.get_mut(topic) {
            self.held.less(s.trim(size, ttl, now));
        }
    }

    /// Puts a new stream for `topic` in place of the old one (if any).
    fn restart(&mut self, topic: &Arc<str>, epoch: &Arc<str>, next: u64, entries: Vec<Entry>) {
        match self.streams.remove(topic) {
            Some(old) => self.held.less(Held {
                messages: old.entries.len(),
                bytes: old.bytes,
            }),
            None if self.streams.len() >= MAX_TOPICS => self.evict_one(),
            None => {}
        }
        let bytes: usize = entries.iter().map(|(_, m)| weight(m)).sum();
        self.held.messages += entries.len();
        self.held.bytes += bytes;
        self.streams.insert(
            topic.clone(),
            Stream {
                epoch: epoch.clone(),
                next,
                entries: entries.into(),
                bytes,
                last_used: self.tick,
                created: self.seq,
                dropped: 0,
            },
        );
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

    /// Every message of the tracked topics among `topics` published after
    /// global sequence `after` (of epoch `epoch`), in global order, each
    /// publish once (a publish to several of them has a copy in each);
    /// `None` unless the history still holds all of them: `after` is of
    /// another epoch or was never given, or a stream dropped (by size or
    /// age) or lost (evicted) a message newer than it. Untracked topics
    /// have nothing to replay and do not prevent it.
    pub fn missed<'t>(
        &mut self,
        topics: impl IntoIterator<Item = &'t str>,
        epoch: &str,
        after: u64,
    ) -> Option<Vec<Arc<Message>>> {
        if epoch != &*self.seq_epoch || after > self.seq {
            return None;
        }
        let (size, ttl, now) = (self.size, self.ttl, Instant::now());
        let mut found: Vec<Arc<Message>> = Vec::new();
        for topic in topics {
            if !self.tracks(topic) {
                continue;
            }
            let Some(s) = self.streams.get_mut(topic) else {
                // No stream: the topic had no publish since, unless its
                // stream was evicted after `after`.
                if after < self.evicted {
                    return None;
                }
                continue;
            };
            self.held.less(s.trim(size, ttl, now));
            if s.dropped > after || (s.created > after && after < self.evicted) {
                return None;
            }
            // Entries are in sequence order: only the tail is newer.
            let newer = s
                .entries
                .iter()
                .rev()
                .take_while(|(_, m)| m.seq.as_ref().is_some_and(|q| q.n > after))
                .count();
            let skip = s.entries.len() - newer;
            found.extend(s.entries.iter().skip(skip).map(|(_, m)| m.clone()));
        }
        in_global_order(&mut found);
        Some(found)
    }

    /// [`History::missed`] when a backplane numbered the publishes: the
    /// tracked topics' streams were just joined to the backplane's copies
    /// ([`History::seed`]) and the caller checked that the backplane
    /// dropped nothing after `after` in `epoch`; here, every message of
    /// them after it, in global order, each publish once.
    pub fn missed_placed<'t>(
        &mut self,
        topics: impl IntoIterator<Item = &'t str>,
        epoch: &str,
        after: u64,
    ) -> Vec<Arc<Message>> {
        let (size, ttl, now) = (self.size, self.ttl, Instant::now());
        let mut found: Vec<Arc<Message>> = Vec::new();
        for topic in topics {
            if !self.tracks(topic) {
                continue;
            }
            let Some(s) = self.streams.get_mut(topic) else {
                continue;
            };
            self.held.less(s.trim(size, ttl, now));
            found.extend(
                s.entries
                    .iter()
                    .filter(|(_, m)| {
                        m.seq
                            .as_ref()
                            .is_some_and(|q| q.n > after && *q.epoch == *epoch)
                    })
                    .map(|(_, m)| m.clone()),
            );
        }
        in_global_order(&mut found);
        found
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
            let newest = s.entries.back().and_then(|(_, m)| m.seq.as_ref());
            self.evicted = self.evicted.max(s.dropped).max(newest.map_or(0, |q| q.n));
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
    fn add(&mut self, kept: &Message) {
        self.messages += 1;
        self.bytes += weight(kept);
    }

    fn less(&mut self, gone: Held) {
        self.messages = self.messages.saturating_sub(gone.messages);
        self.bytes = self.bytes.saturating_sub(gone.bytes);
    }
}

impl Stream {
    /// Gives `msg` the stream's next offset, keeps it, and trims; returns
    /// it shared, and what the trim dropped.
    fn push_next(
        &mut self,
        mut msg: Message,
        tick: u64,
        size: usize,
        ttl: Duration,
        now: Instant,
    ) -> (Arc<Message>, Held) {
        msg.position = Some(Position {
            offset: self.next,
            epoch: self.epoch.clone(),
        });
        self.next += 1;
        self.last_used = tick;
        let msg = Arc::new(msg);
        self.bytes += weight(&msg);
        self.entries.push_back((now, msg.clone()));
        let gone = self.trim(size, ttl, now);
        (msg, gone)
    }

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
                if let Some(seq) = &m.seq {
                    self.dropped = self.dropped.max(seq.n);
                }
                let bytes = weight(&m);
                self.bytes = self.bytes.saturating_sub(bytes);
                gone.messages += 1;
                gone.bytes += bytes;
            }
        }
        gone
    }
}

/// Sorts messages gathered from several topics' streams by their global
/// sequence and keeps one copy of each: a publish to several tracked
/// rooms stands in each of their streams.
fn in_global_order(found: &mut Vec<Arc<Message>>) {
    let n = |m: &Arc<Message>| m.seq.as_ref().map_or(0, |q| q.n);
    found.sort_by_key(n);
    found.dedup_by_key(|m| n(m));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;

    fn publish(h: &mut History, topic: &str, n: i64) -> Arc<Message> {
        publish_rooms(h, &[topic], n).remove(0)
    }

    /// One publish to several topics, as `Hub::deliver_rooms` makes it:
    /// one global sequence, a position per tracked topic.
    fn publish_rooms(h: &mut History, topics: &[&str], n: i64) -> Vec<Arc<Message>> {
        let seq = h.next_seq();
        topics
            .iter()
            .map(|topic| {
                let topic: Arc<str> = Arc::from(*topic);
                let mut m = Message::new(topic.clone(), None, payload_of(&n));
                m.seq = Some(seq.clone());
                if h.tracks(&topic) {
                    h.keep_new(m)
                } else {
                    Arc::new(m)
                }
            })
            .collect()
    }

    fn payloads(msgs: &[Arc<Message>]) -> Vec<String> {
        msgs.iter().map(|m| m.payload.get().to_string()).collect()
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

    /// A message as a backplane placed it: offset `n` of epoch `e`.
    fn placed(topic: &str, e: &str, n: u64) -> Arc<Message> {
        let mut m = Message::new(Arc::from(topic), None, payload_of(&n));
        m.position = Some(Position {
            offset: n,
            epoch: Arc::from(e),
        });
        Arc::new(m)
    }

    #[test]
    fn a_fetched_copy_joins_what_arrived_live_and_what_it_held_is_not_delivered_twice() {
        let mut h = History::new(
            vec![Filter::parse("#").unwrap()],
            100,
            Duration::from_secs(60),
        );
        let since = |offset| Since {
            offset,
            epoch: "e".into(),
        };
        // Followed from offset 5 on: a gap before it, so no recovery yet.
        assert!(h.place(&placed("t", "e", 5)) && h.place(&placed("t", "e", 6)));
        assert!(h.since("t", &since(2)).is_none());
        // The backplane held 1..=7 (7 is still on its way here).
        let fetched = (1..=7).map(|n| placed("t", "e", n)).collect();
        h.seed(&Arc::from("t"), &Arc::from("e"), 7, fetched);
        assert_eq!(
            h.since("t", &since(2)).map(|m| offsets(&m)),
            Some(vec![3, 4, 5, 6])
        );
        assert!(h.place(&placed("t", "e", 7)), "7 arrives live: new here");
        // Fetched with nothing here: 1..=3; 2 and 3 then arrive, already held.
        let fetched = (1..=3).map(|n| placed("u", "e", n)).collect();
        h.seed(&Arc::from("u"), &Arc::from("e"), 3, fetched);
        assert!(!h.place(&placed("u", "e", 2)) && !h.place(&placed("u", "e", 3)));
        assert!(h.place(&placed("u", "e", 4)));
        assert_eq!(
            h.since("u", &since(0)).map(|m| offsets(&m)),
            Some(vec![1, 2, 3, 4])
        );
        // A gap or another epoch starts the stream again.
        assert!(h.place(&placed("u", "e", 9)));
        assert!(h.since("u", &since(4)).is_none());
        assert!(h.place(&placed("u", "f", 1)));
        assert!(h.since("u", &since(8)).is_none());
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

    #[test]
    fn missed_orders_every_topic_together_and_needs_every_message() {
        let mut h = History::new(
            vec![Filter::parse("t/#").unwrap()],
            3,
            Duration::from_secs(60),
        );
        let epoch = h.seq_epoch().to_string();
        let first = publish(&mut h, "t/a", 1);
        let after = first.seq.as_ref().unwrap().n;
        publish(&mut h, "t/b", 2);
        // One publish to both topics and an untracked one: one sequence.
        let copies = publish_rooms(&mut h, &["u", "t/a", "t/b"], 3);
        assert!(copies.iter().all(|m| m.seq == copies[0].seq));
        assert!(copies[0].position.is_none() && copies[1].position.is_some());
        publish(&mut h, "t/a", 4);
        publish(&mut h, "t/c", 5);
        let got = h.missed(["t/a", "t/b", "u", "x"], &epoch, after).unwrap();
        assert_eq!(payloads(&got), ["2", "3", "4"], "once each, in order");
        let got = h.missed(["t/b"], &epoch, after).unwrap();
        assert_eq!(payloads(&got), ["2", "3"]);
        // Nothing newer; another epoch; a sequence never given.
        let last = h.seq;
        assert_eq!(h.missed(["t/a"], &epoch, last).unwrap().len(), 0);
        assert!(h.missed(["t/a"], "other", after).is_none());
        assert!(h.missed(["t/a"], &epoch, last + 1).is_none());
        // Only untracked topics: nothing to replay, and nothing missing.
        assert_eq!(h.missed(["u"], &epoch, 0).unwrap().len(), 0);

        // t/a keeps 3: publishing 2 more drops `3`, which a client that
        // saw only `first` has not seen; one that saw `3` has lost nothing.
        publish(&mut h, "t/a", 6);
        publish(&mut h, "t/a", 7);
        assert!(h.missed(["t/a"], &epoch, after).is_none());
        assert!(
            h.missed(["t/b"], &epoch, after).is_some(),
            "t/b lost nothing"
        );
        let seen = copies[0].seq.as_ref().unwrap().n;
        let got = h.missed(["t/a", "t/b"], &epoch, seen).unwrap();
        assert_eq!(payloads(&got), ["4", "6", "7"]);
    }

    #[test]
    fn an_evicted_stream_is_lost_for_clients_from_before() {
        let mut h = History::new(
            vec![Filter::parse("#").unwrap()],
            10,
            Duration::from_secs(60),
        );
        let epoch = h.seq_epoch().to_string();
        publish(&mut h, "a", 1);
        let before = h.seq;
        for n in 0..MAX_TOPICS {
            publish(&mut h, &format!("t{n}"), 1);
        }
        // `a` was evicted: a client from before may have missed it.
        assert!(!h.streams.contains_key("a"));
        assert!(h.missed(["a"], &epoch, before - 1).is_none());
        // `a` again: a new stream, which cannot vouch for the old one.
        publish(&mut h, "a", 2);
        assert!(h.missed(["a"], &epoch, before).is_none());
        let now = h.seq;
        assert_eq!(
            h.missed(["a", "zz"], &epoch, now - 1).map(|m| payloads(&m)),
            Some(vec!["2".to_string()])
        );
    }
}
