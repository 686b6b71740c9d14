//! The few JetStream calls the NATS backplane makes, as plain requests on
//! its one core connection (JetStream's API is request and reply on
//! `$JS.API.…` subjects): creating a stream, publishing (acknowledged,
//! optionally with a compare-and-set on a subject's last message), reading
//! a subject's last message, reading every message a stream holds on one
//! subject, and purging a subject.
//!
//! Written against nats-server 2.9 (Debian's), the oldest this project
//! supports: direct gets (`allow_direct`) and republish exist there, batch
//! direct gets do not, so a subject is read through a short-lived
//! consumer.

use std::time::Duration;

use async_nats::{Client, HeaderMap, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;

/// How long one JetStream call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// JetStream's error code for a stream that exists with another
/// configuration (then it is updated).
const STREAM_EXISTS: u64 = 10_058;
/// JetStream's error code for a publish whose expected last subject
/// sequence is not the subject's.
const WRONG_LAST_SEQUENCE: u64 = 10_071;

/// The header that makes a publish conditional on its subject's last
/// stored message.
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// A message a stream holds.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its sequence in the stream.
    pub seq: u64,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

impl Stored {
    /// A header's value, as a number.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.headers.as_ref()?.get(name)?.as_str().parse().ok()
    }
}

/// Why a conditional publish was not stored.
#[derive(Debug)]
pub enum Refused {
    /// The subject's last message is not the one expected: another
    /// publisher was first.
    NotLast,
    Failed(String),
}

async fn request(client: &Client, subject: String, body: Bytes) -> Result<Bytes, String> {
    request_with(client, subject, None, body).await
}

async fn request_with(
    client: &Client,
    subject: String,
    headers: Option<HeaderMap>,
    body: Bytes,
) -> Result<Bytes, String> {
    let call = async {
        match headers {
            Some(h) => client.request_with_headers(subject, h, body).await,
            None => client.request(subject, body).await,
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(reply)) => Ok(reply.payload),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Err(
            "the NATS server runs without JetStream (start it with -js), or the stream is gone"
                .into(),
        ),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// An API answer, or its error's code and description.
fn answer(payload: &[u8]) -> Result<Result<serde_json::Value, (u64, String)>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("unreadable answer: {e}"))?;
    Ok(match value.get("error") {
        None => Ok(value),
        Some(err) => Err((
            err["err_code"].as_u64().unwrap_or(0),
            err["description"].as_str().unwrap_or("refused").to_string(),
        )),
    })
}

/// Creates the stream `config` describes, or brings an existing one to
/// that configuration; returns the stream's information (its `created`
/// time tells one incarnation of the stream from the next).
pub async fn ensure_stream(
    client: &Client,
    config: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let name = config["name"].as_str().unwrap_or_default().to_string();
    let body = Bytes::from(config.to_string());
    for verb in ["CREATE", "UPDATE"] {
        let subject = format!("$JS.API.STREAM.{verb}.{name}");
        let reply = request(client, subject, body.clone())
            .await
            .map_err(|e| format!("stream {name}: {e}"))?;
        match answer(&reply).map_err(|e| format!("stream {name}: {e}"))? {
            Ok(info) => return Ok(info),
            Err((STREAM_EXISTS, _)) if verb == "CREATE" => {}
            Err((_, why)) => return Err(format!("stream {name}: {why}")),
        }
    }
    Err(format!("stream {name}: not created"))
}

/// Stores `body` on `subject` if the last message the stream holds there
/// is the one with sequence `last` (0: none); returns the new message's
/// sequence.
pub async fn publish_if_last(
    client: &Client,
    subject: String,
    last: u64,
    body: Bytes,
) -> Result<u64, Refused> {
    publish(client, subject, Some(last), body).await
}

/// Stores `body` on `subject` and waits for the stream's acknowledgement;
/// with `last`, only if the last message the stream holds there is the
/// one with that sequence (0: none). Returns the new message's sequence.
pub async fn publish(
    client: &Client,
    subject: String,
    last: Option<u64>,
    body: Bytes,
) -> Result<u64, Refused> {
    let headers = last.map(|last| {
        let mut headers = HeaderMap::new();
        headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, last.to_string().as_str());
        headers
    });
    let reply = request_with(client, subject, headers, body)
        .await
        .map_err(Refused::Failed)?;
    match answer(&reply).map_err(Refused::Failed)? {
        Ok(ack) => ack["seq"]
            .as_u64()
            .ok_or_else(|| Refused::Failed("publish acknowledged without a sequence".into())),
        Err((WRONG_LAST_SEQUENCE, _)) => Err(Refused::NotLast),
        Err((_, why)) => Err(Refused::Failed(why)),
    }
}

/// The last message `stream` holds on `subject` (a direct get: the
/// stream needs `allow_direct`).
pub async fn last_on(
    client: &Client,
    stream: &str,
    subject: &str,
) -> Result<Option<Stored>, String> {
    let request = serde_json::json!({ "last_by_subj": subject }).to_string();
    let call = client.request(format!("$JS.API.DIRECT.GET.{stream}"), Bytes::from(request));
    let reply = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => return Err(format!("stream {stream}: {e}")),
        Err(_) => return Err(format!("stream {stream}: timed out")),
    };
    if let Some(status) = reply.status {
        return match status.as_u16() {
            404 => Ok(None),
            code => Err(format!(
                "stream {stream}: {code} {}",
                reply.description.unwrap_or_default()
            )),
        };
    }
    let seq = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Sequence"))
        .and_then(|v| v.as_str().parse().ok())
        .ok_or_else(|| format!("stream {stream}: a direct get without its sequence"))?;
    Ok(Some(Stored {
        seq,
        headers: reply.headers,
        payload: reply.payload,
    }))
}

/// Removes the messages `stream` holds on `subject`; with `before`, only
/// those whose sequence is lower. Returns how many went: of two purges of
/// one message, one removes it and the other finds nothing.
pub async fn purge(
    client: &Client,
    stream: &str,
    subject: &str,
    before: Option<u64>,
) -> Result<u64, String> {
    let body = match before {
        Some(seq) => serde_json::json!({ "filter": subject, "seq": seq }),
        None => serde_json::json!({ "filter": subject }),
    };
    let reply = request(
        client,
        format!("$JS.API.STREAM.PURGE.{stream}"),
        Bytes::from(body.to_string()),
    )
    .await
    .map_err(|e| format!("stream {stream}: {e}"))?;
    let answer = answer(&reply)
        .map_err(|e| format!("stream {stream}: {e}"))?
        .map_err(|(_, why)| format!("stream {stream}: {why}"))?;
    answer["purged"]
        .as_u64()
        .ok_or_else(|| format!("stream {stream}: a purge answered without its count"))
}

/// Every message `stream` holds on `subject`, in order, `max` at most:
/// through a consumer of its own that lives for this read only.
pub async fn read_subject(
    client: &Client,
    stream: &str,
    subject: &str,
    max: usize,
) -> Result<Vec<Stored>, String> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    let config = serde_json::json!({
        "stream_name": stream,
        "config": {
            "deliver_subject": inbox,
            "deliver_policy": "all",
            "ack_policy": "none",
            "filter_subject": subject,
            "replay_policy": "instant",
            "mem_storage": true,
            "inactive_threshold": u64::try_from(CALL_TIMEOUT.as_nanos()).unwrap_or(u64::MAX),
        },
    });
    let reply = request(
        client,
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        Bytes::from(config.to_string()),
    )
    .await
    .map_err(|e| format!("stream {stream}: {e}"))?;
    let info = answer(&reply)
        .map_err(|e| format!("stream {stream}: {e}"))?
        .map_err(|(_, why)| format!("stream {stream}: {why}"))?;
    let consumer = info["name"].as_str().unwrap_or_default().to_string();
    let pending = info["num_pending"].as_u64().unwrap_or(0);
    let mut out = Vec::with_capacity(usize::try_from(pending).unwrap_or(max).min(max));
    let read = async {
        let mut left = pending;
        while left > 0 && out.len() < max {
            let Some(msg) = sub.next().await else {
                return Err(format!("stream {stream}: the read ended early"));
            };
            // `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`
            // (nats-server 2.9; later servers may add a domain and an
            // account before the stream: counted from the end).
            let tokens: Vec<&str> = msg.reply.as_deref().unwrap_or("").split('.').collect();
            let from_end = |k: usize| tokens.len().checked_sub(k).and_then(|i| tokens.get(i));
            let (seq, after) = if tokens.len() == 9 {
                (from_end(4), from_end(1))
            } else {
                (from_end(5), from_end(2))
            };
            let (Some(seq), Some(after)) = (
                seq.and_then(|s| s.parse::<u64>().ok()),
                after.and_then(|s| s.parse::<u64>().ok()),
            ) else {
                return Err(format!("stream {stream}: a message without its metadata"));
            };
            out.push(Stored {
                seq,
                headers: msg.headers,
                payload: msg.payload,
            });
            left = after;
        }
        Ok(())
    };
    let result = match tokio::time::timeout(CALL_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(format!("stream {stream}: read timed out")),
    };
    // The consumer would go by itself after its inactive threshold.
    let _ = client
        .publish(
            format!("$JS.API.CONSUMER.DELETE.{stream}.{consumer}"),
            Bytes::new(),
        )
        .await;
    drop(sub);
    result.map(|()| out)
}
