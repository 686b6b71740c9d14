//! A minimal Socket.IO client over a raw WebSocket, for Rust-side protocol
//! tests (the real JS clients are exercised in `tests/interop/`). It speaks
//! Engine.IO 4 (socket.io v5) or Engine.IO 3 (socket.io v4, what 2.x clients
//! and sails.io.js use), answers pings, and waits for packets with a timeout.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(5);

/// What the client saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// `42<ns>,[event, ...args]`
    Event(String, Vec<Value>),
    /// `43<ns>,<id>[args]`
    Ack(u64, Vec<Value>),
    /// `41<ns>,`
    Disconnect,
    /// The WebSocket closed.
    Closed,
}

pub struct SioClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub eio: u8,
    pub ns: String,
    /// The engine session id.
    pub engine_id: String,
    /// The namespace socket id as the server reports it on CONNECT (EIO4).
    pub sid: Option<String>,
    /// The private session id the server sent on CONNECT, if any
    /// (connection state recovery).
    pub pid: Option<String>,
    /// As socket.io-client keeps it: the last argument of the last event
    /// received while a pid is known, when it is a string.
    pub last_offset: Option<String>,
    next_ack: u64,
}

impl SioClient {
    /// Connects and joins `ns` (`/notifications`).
    pub async fn connect(addr: SocketAddr, eio: u8, ns: &str) -> SioClient {
        let mut c = Self::open(addr, eio).await;
        c.join(ns).await;
        c
    }

    /// Opens the Engine.IO connection only.
    pub async fn open(addr: SocketAddr, eio: u8) -> SioClient {
        let url = format!("ws://{addr}/socket.io/?EIO={eio}&transport=websocket");
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut c = SioClient {
            ws,
            eio,
            ns: "/".into(),
            engine_id: String::new(),
            sid: None,
            pid: None,
            last_offset: None,
            next_ack: 1,
        };
        let open = c.engine_packet().await.expect("engine open packet");
        assert!(open.starts_with('0'), "engine open: {open}");
        let v: Value = serde_json::from_str(&open[1..]).expect("open json");
        c.engine_id = v["sid"].as_str().expect("sid").to_string();
        if eio == 3 {
            // The server connects EIO3 clients to `/` on its own.
            let t = c.text().await.expect("root connect");
            assert_eq!(t, "0", "root connect");
        }
        c
    }

    pub async fn join(&mut self, ns: &str) {
        if ns == "/" {
            self.join_as(ns, "40").await;
        } else {
            self.join_as(ns, &format!("40{ns},")).await;
        }
    }

    /// Joins `ns` by sending `packet` as the CONNECT packet (e.g. with the
    /// query string socket.io-client 2.x appends).
    pub async fn join_as(&mut self, ns: &str, packet: &str) {
        self.ns = ns.to_string();
        self.send_raw(packet).await;
        let t = self.text().await.expect("namespace connect");
        let (prefix, body) = if ns == "/" {
            ("0".to_string(), t.strip_prefix('0'))
        } else {
            let prefix = format!("0{ns}");
            let body = t.strip_prefix(&format!("{prefix},"));
            (prefix, body)
        };
        assert!(t.starts_with(&prefix), "namespace connect: {t}");
        if let Some(rest) = body
            && !rest.is_empty()
        {
            let v: Value = serde_json::from_str(rest).expect("connect json");
            self.sid = v["sid"].as_str().map(str::to_string);
            self.pid = v["pid"].as_str().map(str::to_string);
        }
    }

    /// Joins `ns` (not the root) with `auth` as the CONNECT packet's data,
    /// as socket.io-client sends `{pid, offset}` when it reconnects.
    pub async fn join_with_auth(&mut self, ns: &str, auth: &Value) {
        self.join_as(ns, &format!("40{ns},{auth}")).await;
    }

    /// Opens a new Engine.IO 4 connection and joins `ns` as socket.io-client
    /// does after it lost its connection: with the `pid` it was told and
    /// the last `offset` it saw. See [`SioClient::recovered`].
    pub async fn reconnect(addr: SocketAddr, ns: &str, pid: &str, offset: &str) -> SioClient {
        let mut c = Self::open(addr, 4).await;
        c.join_with_auth(ns, &json!({"pid": pid, "offset": offset}))
            .await;
        c
    }

    /// Whether the server recovered the session asked for with `pid`:
    /// socket.io-client's `socket.recovered` (the CONNECT answer carries
    /// the same pid).
    pub fn recovered(&self, pid: &str) -> bool {
        self.pid.as_deref() == Some(pid)
    }

    /// The id the client sees as `socket.id`.
    pub fn socket_id(&self) -> String {
        match self.eio {
            3 if self.ns == "/" => self.engine_id.clone(),
            3 => format!("{}#{}", self.ns, self.engine_id),
            _ => self.sid.clone().unwrap_or_default(),
        }
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .expect("send");
    }

    /// The next engine message packet's text (answering pings on the way);
    /// `None` when the connection closed.
    async fn text(&mut self) -> Option<String> {
        loop {
            let t = self.engine_packet().await?;
            if let Some(rest) = t.strip_prefix('4') {
                return Some(rest.to_string());
            }
        }
    }

    /// The next Socket.IO packet's text, whatever its namespace.
    pub async fn raw_message(&mut self) -> String {
        self.text().await.expect("a socket.io packet")
    }

    /// The next Engine.IO packet other than ping/pong, whole.
    pub async fn engine_packet(&mut self) -> Option<String> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a packet in time");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let t = t.to_string();
                    if t == "2" {
                        self.send_raw("3").await;
                        continue;
                    }
                    if t == "3" {
                        continue;
                    }
                    return Some(t);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Strips `<type><ns>,` from a socket.io packet.
    fn body<'a>(&self, t: &'a str, kind: char) -> Option<&'a str> {
        let rest = t.strip_prefix(kind)?;
        if self.ns == "/" {
            // Root packets name no namespace; others are not ours.
            return (!rest.starts_with('/')).then_some(rest);
        }
        rest.strip_prefix(self.ns.as_str())
            .map(|r| r.strip_prefix(',').unwrap_or(r))
    }

    /// The next socket.io packet of this namespace.
    pub async fn next(&mut self) -> Packet {
        loop {
            let Some(t) = self.text().await else {
                return Packet::Closed;
            };
            if let Some(b) = self.body(&t, '2') {
                let Ok(Value::Array(mut items)) = serde_json::from_str::<Value>(b) else {
                    panic!("bad event packet {t}");
                };
                let ev = items.remove(0).as_str().unwrap_or_default().to_string();
                if self.pid.is_some()
                    && let Some(Value::String(offset)) = items.last()
                {
                    self.last_offset = Some(offset.clone());
                }
                return Packet::Event(ev, items);
            }
            if let Some(b) = self.body(&t, '3') {
                let split = b.find('[').expect("ack args");
                let id: u64 = b[..split].parse().expect("ack id");
                let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&b[split..]) else {
                    panic!("bad ack packet {t}");
                };
                return Packet::Ack(id, items);
            }
            if self.body(&t, '1').is_some() {
                return Packet::Disconnect;
            }
        }
    }

    /// Emits `event` with `args` and no ack.
    pub async fn emit(&mut self, event: &str, args: &[Value]) {
        let mut items = vec![json!(event)];
        items.extend_from_slice(args);
        let ns = self.ns_prefix();
        self.send_raw(&format!("42{ns}{}", Value::Array(items)))
            .await;
    }

    fn ns_prefix(&self) -> String {
        if self.ns == "/" {
            String::new()
        } else {
            format!("{},", self.ns)
        }
    }

    /// Emits with an ack and returns the ack's first argument (skipping
    /// events that arrive in between). Panics on disconnect.
    pub async fn request(&mut self, event: &str, args: &[Value]) -> Value {
        let id = self.send_request(event, args).await;
        loop {
            match self.next().await {
                Packet::Ack(got, mut args) if got == id => {
                    return if args.is_empty() {
                        Value::Null
                    } else {
                        args.remove(0)
                    };
                }
                Packet::Disconnect | Packet::Closed => panic!("disconnected before the ack"),
                _ => continue,
            }
        }
    }

    /// Emits with an ack id and returns it without waiting for the ack
    /// (see [`SioClient::next_ack`]).
    pub async fn send_request(&mut self, event: &str, args: &[Value]) -> u64 {
        let id = self.next_ack;
        self.next_ack += 1;
        let mut items = vec![json!(event)];
        items.extend_from_slice(args);
        let ns = self.ns_prefix();
        self.send_raw(&format!("42{ns}{id}{}", Value::Array(items)))
            .await;
        id
    }

    /// The next ack (its id and first argument), skipping events. Panics
    /// on disconnect.
    pub async fn next_ack(&mut self) -> (u64, Value) {
        loop {
            match self.next().await {
                Packet::Ack(id, mut args) => {
                    let first = if args.is_empty() {
                        Value::Null
                    } else {
                        args.remove(0)
                    };
                    return (id, first);
                }
                Packet::Disconnect | Packet::Closed => panic!("disconnected before the ack"),
                Packet::Event(..) => continue,
            }
        }
    }

    /// `get /notifications` with the token under `params` (in the
    /// client's current namespace, the root one included).
    pub async fn auth(&mut self, token: &str, params: Value) -> Value {
        let mut p = params;
        p["jwt-api-key"] = json!(token);
        let url = match self.ns.as_str() {
            "/" => "/notifications".to_string(),
            ns => ns.to_string(),
        };
        self.request("get", &[json!({"url": url, "params": p})])
            .await
    }

    /// Switches the namespace that `next`, `emit` and `request` use, on
    /// the same connection (after `join`ing both).
    pub fn use_ns(&mut self, ns: &str) {
        self.ns = ns.to_string();
    }

    /// The next event (skipping acks).
    pub async fn event(&mut self) -> (String, Vec<Value>) {
        loop {
            match self.next().await {
                Packet::Event(e, a) => return (e, a),
                Packet::Ack(..) => continue,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    /// Waits for the namespace disconnect (or the connection closing).
    pub async fn disconnected(&mut self) {
        loop {
            match self.next().await {
                Packet::Disconnect | Packet::Closed => return,
                _ => continue,
            }
        }
    }

    /// Asserts that no event arrives within `d` (only used to show absence).
    pub async fn silent_for(&mut self, d: Duration) {
        if let Ok(p) = tokio::time::timeout(d, self.next()).await {
            panic!("unexpected packet {p:?}");
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
