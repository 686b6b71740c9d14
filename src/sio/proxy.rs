//! Forwarding Sails virtual requests to the application's HTTP backend
//! (`socketio.proxy_url`, SPEC §4).
//!
//! A Sails page sends every request over its socket: `io.socket.get('/x')`
//! is a `get` event with `{method, headers, data, url}` and an ack. pulso
//! answers its own url (the notifications namespace) itself; with a
//! backend configured, any other url becomes a real HTTP request to
//! `proxy_url` + url, and the backend's answer becomes the ack
//! `{body, statusCode, headers}`, as Sails itself would answer it.
//!
//! What goes to the backend: the method, the url, `data` (merged over
//! `params`, as Sails does) as the query string of a GET or the JSON body
//! of any other method, the client headers listed in
//! `socketio.proxy_headers`, and, for an authenticated socket, who it is
//! (`X-Pulso-Sub`, `X-Pulso-Role`, `X-Pulso-Socket-Id`, `X-Pulso-Claims`).
//! A client can never send an `X-Pulso-*` header itself.
//!
//! Everything is bounded: the request is built and checked without
//! waiting (its size, the number in flight on the connection and on the
//! node) and then sent on a task of its own, so the connection goes on
//! reading; the whole exchange has `socketio.proxy_timeout`, and the
//! answer's body is read up to `socketio.proxy_max_body`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Request, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::request::{self, Failure};
use crate::auth::Identity;
use crate::config::ProxyConfig;
use crate::metrics::Metrics;

/// The identity headers pulso adds for an authenticated socket.
pub const SUB: &str = "x-pulso-sub";
pub const ROLE: &str = "x-pulso-role";
pub const SOCKET_ID: &str = "x-pulso-socket-id";
pub const CLAIMS: &str = "x-pulso-claims";
/// Answer headers a backend joins the socket to rooms with, or makes it
/// leave them (`socketio.proxy_rooms`): comma-separated room names.
pub const JOIN: &str = "x-pulso-join";
pub const LEAVE: &str = "x-pulso-leave";

/// Rooms one answer may name in each of `X-Pulso-Join` and `X-Pulso-Leave`.
const MAX_ROOMS_PER_ANSWER: usize = 64;

/// What a url may contain as is; anything else (spaces, quotes, non-ASCII)
/// is percent-encoded, and `%` escapes already there are kept.
const URL_ESCAPED: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'|')
    .add(b'\\')
    .add(b'^');

/// The Sails methods, one Socket.IO event each (what sails.io.js emits).
pub fn method_of(event: &str) -> Option<Method> {
    Some(match event {
        "get" => Method::GET,
        "post" => Method::POST,
        "put" => Method::PUT,
        "patch" => Method::PATCH,
        "delete" => Method::DELETE,
        _ => return None,
    })
}

/// Who sends a request: its socket, and its verified identity once it has
/// authenticated.
pub struct Caller<'a> {
    pub socket_id: &'a str,
    pub identity: Option<&'a Identity>,
}

/// A request checked and ready to go.
#[derive(Debug)]
pub struct Prepared {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// The answer for the client, and the rooms the backend asked for.
#[derive(Debug)]
pub struct Reply {
    pub ack: Value,
    pub join: Vec<String>,
    pub leave: Vec<String>,
}

/// A request admitted under both concurrency limits; they are given back
/// when it is dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    inflight: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The backend and its client, built once per server.
pub struct Proxy {
    cfg: ProxyConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    /// `socketio.proxy_concurrency` permits.
    total: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(cfg.concurrency.min(64))
            .build(connector);
        Proxy {
            total: Arc::new(Semaphore::new(cfg.concurrency)),
            cfg,
            client,
            metrics,
        }
    }

    /// Whether answers may change the socket's rooms.
    pub fn rooms(&self) -> bool {
        self.cfg.rooms
    }

    /// Counts a request answered without the backend (refused here).
    pub fn refused(&self, failure: &Failure) {
        self.count(failure.status);
    }

    fn count(&self, status: u16) {
        self.metrics
            .proxy_requests
            .get_or_create(&[("status", status)])
            .inc();
    }

    /// Builds the HTTP request for virtual request `v`, sent as `method`.
    pub fn prepare(&self, method: Method, v: &Value, caller: &Caller) -> Result<Prepared, Failure> {
        let Value::Object(obj) = v else {
            return Err(Failure::malformed(
                "the request must be an object such as {url: '/path', data: {...}}",
            ));
        };
        let url = request::url_of(obj)?;
        let data = data_of(obj)?;

        let mut target = String::with_capacity(self.cfg.url.len() + url.len() + 16);
        target.push_str(&self.cfg.url);
        if !url.starts_with('/') {
            target.push('/');
        }
        // A fragment is the client's own business.
        let url = url.split('#').next().unwrap_or_default();
        target.extend(utf8_percent_encode(url, URL_ESCAPED));

        let too_large = || {
            Failure::too_large(format!(
                "the request is larger than {} bytes",
                self.cfg.max_body
            ))
        };
        let body = if method == Method::GET {
            let query = query_of(&data)?;
            if query.len() > self.cfg.max_body {
                return Err(too_large());
            }
            if !query.is_empty() {
                target.push(if url.contains('?') { '&' } else { '?' });
                target.push_str(&query);
            }
            Bytes::new()
        } else {
            let body = serde_json::to_vec(&data)
                .map_err(|e| Failure::malformed(format!("`data` cannot be sent: {e}")))?;
            if body.len() > self.cfg.max_body {
                return Err(too_large());
            }
            Bytes::from(body)
        };
        let uri =
            Uri::try_from(target).map_err(|_| Failure::malformed("`url` is not a valid url"))?;

        let mut headers = HeaderMap::new();
        if let Some(Value::Object(sent)) = obj.get("headers") {
            for (name, value) in sent {
                let name = name.to_ascii_lowercase();
                if !self.cfg.headers.contains(&name) {
                    continue;
                }
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => continue,
                };
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&text),
                ) {
                    headers.insert(n, v);
                }
            }
        }
        if !headers.contains_key(header::ACCEPT) {
            headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        }
        if method != Method::GET {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        if let Some(who) = caller.identity {
            let identity = [
                (SUB, who.sub.clone()),
                (ROLE, who.role.clone()),
                (SOCKET_ID, caller.socket_id.to_string()),
                (CLAIMS, ascii_json(&who.claims)),
            ];
            for (name, value) in identity {
                let value = HeaderValue::from_bytes(value.as_bytes()).map_err(|_| {
                    Failure::malformed(format!("the token's identity cannot be sent as `{name}`"))
                })?;
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        Ok(Prepared {
            method,
            uri,
            headers,
            body,
        })
    }

    /// Takes a place under both concurrency limits: the connection's
    /// (`inflight`, its requests in flight) and the node's.
    pub fn admit(&self, inflight: &Arc<AtomicUsize>) -> Result<Slot, Failure> {
        if inflight.fetch_add(1, Ordering::AcqRel) >= self.cfg.socket_concurrency {
            inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Failure::proxy_socket_busy());
        }
        match self.total.clone().try_acquire_owned() {
            Ok(permit) => Ok(Slot {
                _permit: permit,
                inflight: inflight.clone(),
            }),
            Err(_) => {
                inflight.fetch_sub(1, Ordering::AcqRel);
                Err(Failure::proxy_busy())
            }
        }
    }

    /// Sends the request and turns the backend's answer (or its absence)
    /// into the client's ack.
    pub async fn send(&self, p: Prepared) -> Reply {
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.cfg.timeout, self.exchange(p)).await;
        self.metrics
            .proxy_latency
            .observe(started.elapsed().as_secs_f64());
        let reply = match outcome {
            Err(_) => failed(Failure::gateway_timeout(format!(
                "the application did not answer within {} ms",
                self.cfg.timeout.as_millis()
            ))),
            Ok(Err(failure)) => failed(failure),
            Ok(Ok((parts, body))) => self.reply(parts, &body),
        };
        let status = reply.ack["statusCode"].as_u64().unwrap_or(0);
        self.count(u16::try_from(status).unwrap_or(0));
        reply
    }

    async fn exchange(&self, p: Prepared) -> Result<(axum::http::response::Parts, Bytes), Failure> {
        let mut req = Request::new(Full::new(p.body));
        *req.method_mut() = p.method;
        *req.uri_mut() = p.uri;
        *req.headers_mut() = p.headers;
        let res = self.client.request(req).await.map_err(|e| {
            tracing::debug!(error = %e, "socket.io proxy: backend unreachable");
            Failure::bad_gateway("the application cannot be reached")
        })?;
        let (parts, body) = res.into_parts();
        let too_large = || {
            Failure::answer_too_large(format!(
                "the application's answer is larger than {} bytes",
                self.cfg.max_body
            ))
        };
        let announced = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.cfg.max_body as u64) {
            return Err(too_large());
        }
        let body = Limited::new(body, self.cfg.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    too_large()
                } else {
                    tracing::debug!(error = %e, "socket.io proxy: answer broken off");
                    Failure::bad_gateway("the application's answer was broken off")
                }
            })?
            .to_bytes();
        Ok((parts, body))
    }

    /// The ack for an answer: `{body, statusCode, headers}`, the body as
    /// JSON when the answer says it is, else as text.
    fn reply(&self, parts: axum::http::response::Parts, body: &[u8]) -> Reply {
        let is_json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
        let body = if body.is_empty() {
            Value::Null
        } else if is_json {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        } else {
            Value::String(String::from_utf8_lossy(body).into_owned())
        };
        let mut headers = Map::new();
        for name in parts.headers.keys() {
            let n = name.as_str();
            if hidden_answer_header(n) {
                continue;
            }
            let joined = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            headers.insert(n.to_string(), Value::String(joined));
        }
        let (join, leave) = if self.cfg.rooms {
            (
                rooms_in(&parts.headers, JOIN),
                rooms_in(&parts.headers, LEAVE),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        Reply {
            ack: json!({"body": body, "statusCode": parts.status.as_u16(), "headers": headers}),
            join,
            leave,
        }
    }
}

fn failed(f: Failure) -> Reply {
    Reply {
        ack: f.ack(),
        join: Vec::new(),
        leave: Vec::new(),
    }
}

/// What Sails takes as the request's parameters: `data` merged over
/// `params` (objects), or `data` itself when it is an array.
fn data_of(obj: &Map<String, Value>) -> Result<Value, Failure> {
    let mut merged = Map::new();
    for key in ["params", "data"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(fields)) => {
                merged.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Some(Value::Array(items)) if key == "data" => {
                return Ok(Value::Array(items.clone()));
            }
            Some(_) => return Err(Failure::malformed(format!("`{key}` must be an object"))),
        }
    }
    Ok(Value::Object(merged))
}

/// A GET's parameters as a query string: strings as they are, numbers and
/// booleans as text, `null` empty, objects and arrays as JSON.
fn query_of(data: &Value) -> Result<String, Failure> {
    let Value::Object(fields) = data else {
        return Err(Failure::malformed("the `data` of a get must be an object"));
    };
    let pairs: Vec<(&str, String)> = fields
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (k.as_str(), text)
        })
        .collect();
    serde_urlencoded::to_string(pairs).map_err(|e| Failure::malformed(e.to_string()))
}

/// Answer headers the client does not see: the connection's own, cookies
/// (as Sails removes them) and pulso's instructions.
fn hidden_answer_header(name: &str) -> bool {
    name.starts_with("x-pulso-")
        || name.starts_with("proxy-")
        || matches!(
            name,
            "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
                | "set-cookie"
        )
}

/// The room names in every `name` header of an answer: comma-separated,
/// blanks dropped, at most [`MAX_ROOMS_PER_ANSWER`].
fn rooms_in(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .take(MAX_ROOMS_PER_ANSWER)
        .map(str::to_string)
        .collect()
}

/// JSON with every non-ASCII character escaped (`\uXXXX`), so that it is a
/// valid header value.
fn ascii_json(claims: &Map<String, Value>) -> String {
    let text = serde_json::to_string(claims).unwrap_or_else(|_| "{}".into());
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_header_is_ascii_and_the_same_json() {
        let claims = json!({"name": "Ana Peña 😀", "n": 1, "ctl": "a\nb"});
        let text = ascii_json(claims.as_object().unwrap());
        assert!(text.is_ascii(), "{text}");
        assert!(HeaderValue::from_str(&text).is_ok());
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, claims);
    }

    #[test]
    fn data_is_merged_over_params_like_sails() {
        let obj = json!({"url": "/x", "params": {"a": 1, "b": 1}, "data": {"b": 2}});
        assert_eq!(
            data_of(obj.as_object().unwrap()).unwrap(),
            json!({"a": 1, "b": 2})
        );
        let obj = json!({"url": "/x", "data": [1, 2]});
        assert_eq!(data_of(obj.as_object().unwrap()).unwrap(), json!([1, 2]));
        let obj = json!({"url": "/x", "data": "s"});
        assert_eq!(data_of(obj.as_object().unwrap()).unwrap_err().code, "400-1");
        let obj = json!({"url": "/x", "params": [1]});
        assert_eq!(data_of(obj.as_object().unwrap()).unwrap_err().code, "400-1");
    }

    #[test]
    fn query_strings() {
        let q =
            query_of(&json!({"s": "a b&c", "n": 2, "t": true, "z": null, "o": {"k": 1}})).unwrap();
        let mut back: Vec<(String, String)> = serde_urlencoded::from_str(&q).unwrap();
        back.sort();
        assert_eq!(
            back,
            [
                ("n".to_string(), "2".to_string()),
                ("o".into(), "{\"k\":1}".into()),
                ("s".into(), "a b&c".into()),
                ("t".into(), "true".into()),
                ("z".into(), "".into()),
            ]
        );
        assert_eq!(query_of(&json!([1])).unwrap_err().code, "400-1");
    }

    #[test]
    fn room_headers() {
        let mut h = HeaderMap::new();
        h.append(JOIN, HeaderValue::from_static("a, b ,,c"));
        h.append(JOIN, HeaderValue::from_static("d"));
        assert_eq!(rooms_in(&h, JOIN), ["a", "b", "c", "d"]);
        assert!(rooms_in(&h, LEAVE).is_empty());
    }
}
