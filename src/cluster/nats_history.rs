//! The history of the topics `history.topics` matches, kept in NATS
//! JetStream for the whole cluster (SPEC §11), as Redis keeps it.
//!
//! - **One stream, one subject per topic.** `<prefix>-history` holds
//!   `<prefix>.h.<topic>`, at most `history.size` messages per subject
//!   (JetStream's per-subject limit) and none older than `history.ttl`, on
//!   file storage: a node that dies loses nothing, and neither does a NATS
//!   server that restarts.
//! - **Offsets +1 per topic, the same on every node.** A node numbers a
//!   message itself, one after the topic's last, and stores it only if
//!   that last message is still the subject's last (JetStream's
//!   `Nats-Expected-Last-Subject-Sequence`): when another node was first,
//!   it reads the new last message and numbers again. So a node stores
//!   one tracked message per round trip to NATS, in the order they were
//!   published (a socket in several rooms gets them in that order); a
//!   topic's epoch is drawn
//!   when its first message is stored, and lasts while the stream holds a
//!   message of it (a topic quiet for longer than `history.ttl` starts a
//!   new epoch).
//! - **Stored before it is delivered.** The stream republishes every
//!   message it stores on the topic's subject (`<prefix>.t.…`), where the
//!   nodes receive it as any other publish, with its stream sequence: the
//!   cluster-wide sequence that Socket.IO offsets use, in the order every
//!   node receives.
//! - **A publish to several rooms** is stored once per tracked room, as
//!   separate messages, and delivered at its first copy to arrive. Its
//!   copies therefore do not share one place in the cluster-wide sequence:
//!   a recovery across such a publish answers `recovered: false` (the
//!   client reloads) rather than risk a duplicate or a gap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_nats::Client;
use bytes::Bytes;

use super::channel::topic_subject;
use super::jetstream::{self, EXPECTED_LAST_SUBJECT_SEQUENCE, Refused, Stored};
use super::{Envelope, HistoryRules, HistorySource, Outgoing};
use crate::hub::history::{Position, Seq};
use crate::hub::{Fetch, Fetched};

/// The whole history stream's bound, whatever the number of topics.
const STREAM_BYTES: u64 = 1024 * 1024 * 1024;
/// How long the stores of one message are tried before it is given up
/// (delivered on this node only): each retry means another node stored one
/// first.
const STORE_FOR: std::time::Duration = std::time::Duration::from_secs(3);
/// After a lost race on a topic, for this long, each store on it waits a
/// random moment first (up to [`JITTER_MS`]): the node that just won would
/// otherwise win again and again, since its next store needs one round
/// trip and the losers' two (read, then store).
const CONTENDED_FOR: std::time::Duration = std::time::Duration::from_millis(200);
const JITTER_MS: u64 = 3;
/// Topics whose last message a writer remembers; past this it forgets
/// them all and reads each again at its next publish.
const REMEMBERED: usize = 10_000;

/// The history stream's configuration for `rules`.
pub fn stream_config(prefix: &str, rules: &HistoryRules) -> serde_json::Value {
    serde_json::json!({
        "name": stream_name(prefix),
        "subjects": [format!("{prefix}.h.>")],
        "storage": "file",
        "retention": "limits",
        "discard": "old",
        "num_replicas": 1,
        "max_msgs_per_subject": rules.size,
        "max_bytes": STREAM_BYTES,
        "max_age": u64::try_from(rules.ttl.as_nanos()).unwrap_or(u64::MAX),
        "allow_direct": true,
        "republish": {
            "src": format!("{prefix}.h.>"),
            "dest": format!("{prefix}.t.>"),
        },
    })
}

pub fn stream_name(prefix: &str) -> String {
    format!("{prefix}-history")
}

/// The subject a topic's history is stored on.
pub fn subject(prefix: &str, topic: &str) -> String {
    topic_subject(prefix, "h", topic)
}

/// The history in JetStream, shared by the writer (which stores), the
/// subscriber (which makes the stream on each connection) and the hub's
/// recoveries (which read it).
pub struct NatsHistory {
    prefix: String,
    stream: String,
    rules: HistoryRules,
    client: OnceLock<Client>,
    /// The stream's epoch (from its creation time), once made on this
    /// connection: the epoch of the cluster-wide sequence.
    epoch: Mutex<Option<Arc<str>>>,
}

/// A topic's last stored message, as a writer knows it.
#[derive(Clone)]
pub struct Last {
    seq: u64,
    offset: u64,
    epoch: Arc<str>,
    /// When another node last stored first on this topic.
    lost_at: Option<tokio::time::Instant>,
}

/// What a writer remembers of the topics it stored to.
#[derive(Default)]
pub struct Writes {
    last: HashMap<Arc<str>, Last>,
}

impl Writes {
    /// The last message of `room` as known, taken out (a store under way).
    pub fn take(&mut self, room: &str) -> Option<Last> {
        self.last.remove(room)
    }

    /// Puts back what a store left (nothing after a failure: read again).
    pub fn put(&mut self, room: Arc<str>, last: Option<Last>) {
        if let Some(last) = last {
            if self.last.len() >= REMEMBERED {
                self.last.clear();
            }
            self.last.insert(room, last);
        }
    }
}

impl NatsHistory {
    pub fn new(prefix: &str, rules: HistoryRules) -> NatsHistory {
        NatsHistory {
            prefix: prefix.to_string(),
            stream: stream_name(prefix),
            rules,
            client: OnceLock::new(),
            epoch: Mutex::new(None),
        }
    }

    pub fn set_client(&self, client: Client) {
        let _ = self.client.set(client);
    }

    /// Makes the stream on the current connection (or brings it to this
    /// configuration), and takes its epoch.
    pub async fn ensure(&self, client: &Client) -> Result<(), String> {
        let info =
            jetstream::ensure_stream(client, &stream_config(&self.prefix, &self.rules)).await?;
        let created = info["created"].as_str().unwrap_or_default();
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(epoch_of(created));
        Ok(())
    }

    /// The connection was lost: the stream may be another one next time.
    pub fn forget(&self) {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn epoch(&self) -> Option<Arc<str>> {
        self.epoch.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_stream(&self, name: &str) -> bool {
        name == self.stream
    }

    /// Stores copy `i` of `out` (its room keeps a history) as the next
    /// message of that room: numbered after the last one the stream holds
    /// (`last`, if known, else read), and stored only if that is still the
    /// last. Returns the room's new last message.
    pub async fn store(
        &self,
        client: &Client,
        last: Option<Last>,
        out: &Outgoing,
        i: usize,
    ) -> Result<Last, String> {
        let Some(room) = out.rooms.get(i) else {
            return Err("no such room".into());
        };
        let Some(global_epoch) = self.epoch() else {
            return Err("history stream not made yet".into());
        };
        let subject = subject(&self.prefix, room);
        let mut last = match last {
            Some(last) => last,
            None => self.read_last(client, &subject, room, None).await?,
        };
        let deadline = tokio::time::Instant::now() + STORE_FOR;
        while tokio::time::Instant::now() < deadline {
            if last.lost_at.is_some_and(|t| t.elapsed() < CONTENDED_FOR) {
                let wait = rand::random_range(0..=JITTER_MS);
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            let offset = last.offset + 1;
            let body = numbered(
                &out.body,
                out.rooms.len(),
                i,
                offset,
                &last.epoch,
                &global_epoch,
            );
            match jetstream::publish_if_last(client, subject.clone(), last.seq, body).await {
                Ok(seq) => {
                    return Ok(Last {
                        seq,
                        offset,
                        epoch: last.epoch,
                        lost_at: last.lost_at,
                    });
                }
                Err(Refused::NotLast) => {
                    let now = Some(tokio::time::Instant::now());
                    last = self.read_last(client, &subject, room, now).await?;
                }
                Err(Refused::Failed(why)) => return Err(why),
            }
        }
        Err(format!(
            "{room}: other nodes stored first for {} s",
            STORE_FOR.as_secs()
        ))
    }

    /// The last message the stream holds of `room`: its sequence, offset
    /// and epoch; none, or an unreadable one, starts a new epoch.
    async fn read_last(
        &self,
        client: &Client,
        subject: &str,
        room: &str,
        lost_at: Option<tokio::time::Instant>,
    ) -> Result<Last, String> {
        let stored = jetstream::last_on(client, &self.stream, subject).await?;
        let fresh = |seq| Last {
            seq,
            offset: 0,
            epoch: Arc::from(crate::hub::random_id()),
            lost_at,
        };
        let Some(stored) = stored else {
            return Ok(fresh(0));
        };
        Ok(match position_in(&stored.payload, room) {
            Some((offset, epoch)) => Last {
                seq: stored.seq,
                offset,
                epoch: Arc::from(epoch),
                lost_at,
            },
            None => fresh(stored.seq),
        })
    }
}

/// A short epoch for the stream's creation time.
fn epoch_of(created: &str) -> Arc<str> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in created.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Arc::from(format!("{h:016x}"))
}

/// The envelope `body` with the position of its room `i` (of `rooms`):
/// offsets and epochs for each room (0 and "" for the others) and the
/// cluster-wide sequence's epoch. The sequence itself is the stream's, and
/// comes with the message ([`with_sequence`]).
fn numbered(
    body: &[u8],
    rooms: usize,
    i: usize,
    offset: u64,
    epoch: &str,
    global_epoch: &str,
) -> Bytes {
    use std::fmt::Write;
    let Some(open) = body.strip_suffix(b"}") else {
        return Bytes::copy_from_slice(body);
    };
    let mut tail = String::with_capacity(32 + rooms * 4 + epoch.len() + global_epoch.len());
    tail.push_str(",\"o\":[");
    for r in 0..rooms {
        if r > 0 {
            tail.push(',');
        }
        let _ = write!(tail, "{}", if r == i { offset } else { 0 });
    }
    tail.push_str("],\"h\":[");
    for r in 0..rooms {
        if r > 0 {
            tail.push(',');
        }
        let e = if r == i { epoch } else { "" };
        let _ = write!(tail, "\"{e}\"");
    }
    let _ = write!(tail, "],\"ge\":\"{global_epoch}\"}}");
    let mut out = Vec::with_capacity(open.len() + tail.len());
    out.extend_from_slice(open);
    out.extend_from_slice(tail.as_bytes());
    Bytes::from(out)
}

/// A stored envelope with its stream sequence added, as the cluster-wide
/// sequence (`g`): what the stream republishes carries the sequence in a
/// header only.
pub fn with_sequence(body: &[u8], seq: u64) -> Option<Bytes> {
    let open = body.strip_suffix(b"}")?;
    let mut out = Vec::with_capacity(open.len() + 24);
    out.extend_from_slice(open);
    out.extend_from_slice(format!(",\"g\":{seq}}}").as_bytes());
    Some(Bytes::from(out))
}

/// The offset and epoch an envelope gives `room`.
fn position_in(body: &[u8], room: &str) -> Option<(u64, String)> {
    let env: Envelope<'_> = serde_json::from_slice(body).ok()?;
    let i = env.rooms.iter().position(|r| r == room)?;
    let offset = *env.offsets.get(i).filter(|o| **o > 0)?;
    let epoch = env.epochs.get(i)?.to_string();
    Some((offset, epoch))
}

impl HistorySource for NatsHistory {
    fn fetch(&self, topic: Arc<str>) -> Fetch {
        let client = self.client.get().cloned();
        let stream = self.stream.clone();
        let subject = subject(&self.prefix, &topic);
        let size = self.rules.size;
        Box::pin(async move {
            let Some(client) = client else {
                return Err("not connected to NATS yet".into());
            };
            let stored = jetstream::read_subject(&client, &stream, &subject, size).await?;
            Ok(fetched(&topic, stored))
        })
    }
}

/// A topic's stored messages, as delivered live: those of its current
/// epoch after the last copy of a publish to several rooms (see the
/// module's documentation), with what came before counted as dropped.
fn fetched(topic: &Arc<str>, stored: Vec<Stored>) -> Fetched {
    let mut out = Fetched::default();
    // The sequence before the first message kept: what the client must
    // have read for nothing to be missing.
    let mut before_first = 0;
    for s in &stored {
        let Ok(env) = serde_json::from_slice::<Envelope<'_>>(&s.payload) else {
            continue;
        };
        let Some(i) = env.rooms.iter().position(|r| **r == **topic) else {
            continue;
        };
        let (Some(&offset), Some(epoch)) = (env.offsets.get(i), env.epochs.get(i)) else {
            continue;
        };
        let global_epoch: Option<Arc<str>> = env.global_epoch.as_deref().map(Arc::from);
        if *out.epoch != **epoch || env.rooms.len() > 1 {
            // A new epoch, or a publish to several rooms: what came before
            // cannot be replayed with it.
            out.messages.clear();
            out.epoch = Arc::from(&**epoch);
            before_first = if env.rooms.len() > 1 {
                s.seq
            } else {
                s.number(EXPECTED_LAST_SUBJECT_SEQUENCE).unwrap_or(0)
            };
        }
        out.last = offset;
        out.global_epoch = global_epoch.clone().or(out.global_epoch);
        if env.rooms.len() > 1 {
            continue;
        }
        if out.messages.is_empty() && offset > 1 {
            // Its predecessors are gone (by size or age): the last of them
            // is the one it was stored after.
            before_first = before_first.max(s.number(EXPECTED_LAST_SUBJECT_SEQUENCE).unwrap_or(0));
        }
        let position = Position {
            offset,
            epoch: out.epoch.clone(),
        };
        let seq = global_epoch.map(|epoch| Seq { epoch, n: s.seq });
        out.messages
            .push(Arc::new(env.message_for(topic, position, seq)));
    }
    out.dropped_seq = before_first;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_added_to_the_envelope_and_read_back() {
        let body = br#"{"n":1,"s":2,"r":["a","b"],"t":3,"p":{"x":1}}"#;
        let placed = numbered(body, 2, 1, 7, "E1", "G1");
        assert_eq!(
            std::str::from_utf8(&placed).unwrap(),
            r#"{"n":1,"s":2,"r":["a","b"],"t":3,"p":{"x":1},"o":[0,7],"h":["","E1"],"ge":"G1"}"#
        );
        assert_eq!(position_in(&placed, "b"), Some((7, "E1".to_string())));
        assert_eq!(position_in(&placed, "a"), None);
        let received = with_sequence(&placed, 42).unwrap();
        let env: Envelope<'_> = serde_json::from_slice(&received).unwrap();
        assert_eq!(env.global, Some(42));
        let placed = env.placed().unwrap();
        assert_eq!(placed.positions[1].as_ref().map(|p| p.offset), Some(7));
        assert!(placed.positions[0].is_none());
        assert_eq!(placed.seq.map(|s| s.n), Some(42));
    }

    fn stored(seq: u64, after: u64, rooms: &[&str], i: usize, offset: u64, epoch: &str) -> Stored {
        let r: Vec<String> = rooms.iter().map(|r| format!("\"{r}\"")).collect();
        let body = format!(
            r#"{{"n":1,"s":{seq},"r":[{}],"t":{},"p":{seq}}}"#,
            r.join(","),
            crate::hub::now_ms()
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, after.to_string().as_str());
        Stored {
            seq,
            headers: Some(headers),
            payload: numbered(body.as_bytes(), rooms.len(), i, offset, epoch, "G"),
        }
    }

    fn offsets(f: &Fetched) -> Vec<u64> {
        f.messages
            .iter()
            .map(|m| m.position.as_ref().unwrap().offset)
            .collect()
    }

    #[test]
    fn a_whole_history_is_fetched_with_nothing_dropped() {
        let topic: Arc<str> = Arc::from("a");
        let f = fetched(
            &topic,
            vec![
                stored(3, 0, &["a"], 0, 1, "E"),
                stored(5, 3, &["a"], 0, 2, "E"),
            ],
        );
        assert_eq!((&*f.epoch, f.last, f.dropped_seq), ("E", 2, 0));
        assert_eq!(offsets(&f), [1, 2]);
        assert_eq!(f.messages[1].seq.as_ref().map(|s| s.n), Some(5));
        assert_eq!(f.global_epoch.as_deref(), Some("G"));
    }

    #[test]
    fn what_was_trimmed_counts_as_dropped_up_to_the_first_kept() {
        let topic: Arc<str> = Arc::from("a");
        let f = fetched(
            &topic,
            vec![
                stored(9, 7, &["a"], 0, 4, "E"),
                stored(12, 9, &["a"], 0, 5, "E"),
            ],
        );
        assert_eq!((f.last, f.dropped_seq), (5, 7));
        assert_eq!(offsets(&f), [4, 5]);
    }

    #[test]
    fn history_starts_again_after_a_publish_to_several_rooms_and_at_a_new_epoch() {
        let topic: Arc<str> = Arc::from("a");
        let f = fetched(
            &topic,
            vec![
                stored(3, 0, &["a"], 0, 1, "E"),
                stored(4, 3, &["b", "a"], 1, 2, "E"),
                stored(6, 4, &["a"], 0, 3, "E"),
            ],
        );
        assert_eq!((f.last, f.dropped_seq), (3, 4));
        assert_eq!(offsets(&f), [3]);
        let f = fetched(
            &topic,
            vec![
                stored(3, 0, &["a"], 0, 1, "E"),
                stored(8, 0, &["a"], 0, 1, "F"),
            ],
        );
        assert_eq!((&*f.epoch, f.last, f.dropped_seq), ("F", 1, 0));
        assert_eq!(offsets(&f), [1]);
    }
}
