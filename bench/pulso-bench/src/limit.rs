//! The "limit" server: the ceiling for this machine. `GET /ws` upgrades with
//! no auth; every client text frame is answered with one constant ack frame;
//! `POST /api/publish` (or `/api/broadcast`) turns the request body, as is,
//! into one pre-serialized text frame that every socket's writer copies to
//! its socket (several queued frames in one write). No JSON, no topics, no
//! tokens: only what any server must do to fan a message out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};

use crate::net::{self, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Result, err};

const ACK: &[u8] = br#"{"type":"ack","id":1}"#;

struct State {
    tx: broadcast::Sender<Bytes>,
    sockets: AtomicUsize,
}

pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("limit server listening on {}", listener.local_addr()?);
    // Capacity is the most messages one socket may lag behind.
    let (tx, _) = broadcast::channel(4096);
    let state = Arc::new(State {
        tx,
        sockets: AtomicUsize::new(0),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: keep serving the others.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _ = handle(stream, state).await;
        });
    }
}

/// Frames `payload` as one unmasked server text frame.
fn server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.extend_from_slice(&[0x80 | opcode]);
    let len = payload.len();
    if len < 126 {
        out.extend_from_slice(&[len as u8]);
    } else if len < 65536 {
        out.extend_from_slice(&[126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out.freeze()
}

async fn handle(mut stream: TcpStream, state: Arc<State>) -> Result<()> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let end = loop {
            if let Some(p) = net::find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 64 * 1024 {
                return Err(err("request head too long"));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.advance(end);
        let mut first = head.lines().next().unwrap_or("").split_whitespace();
        let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        if method == "GET" && path.starts_with("/ws") {
            let key = header("sec-websocket-key").ok_or_else(|| err("no key"))?;
            let mut h = Sha1::new();
            h.update(key.as_bytes());
            h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
            let accept = base64::engine::general_purpose::STANDARD.encode(h.finalize());
            let rx = state.tx.subscribe();
            stream
                .write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
            state.sockets.fetch_add(1, Ordering::Relaxed);
            let r = websocket(stream, buf, rx).await;
            state.sockets.fetch_sub(1, Ordering::Relaxed);
            return r;
        }
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let body = buf.split_to(len);
        let (status, answer) = if method == "POST" && path.starts_with("/api/") {
            let n = state.tx.send(server_frame(OP_TEXT, &body)).unwrap_or(0);
            ("200 OK", format!(r#"{{"recipients":{n}}}"#))
        } else {
            (
                "404 Not Found",
                r#"{"error":{"code":"not_found"}}"#.to_string(),
            )
        };
        stream
            .write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                    answer.len()
                )
                .as_bytes(),
            )
            .await?;
    }
}

async fn websocket(
    stream: TcpStream,
    mut buf: BytesMut,
    mut rx: broadcast::Receiver<Bytes>,
) -> Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Bytes>(64);
    let writer = tokio::spawn(async move {
        let mut batch = BytesMut::new();
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m {
                    Ok(m) => m,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                c = ctl_rx.recv() => match c {
                    Some(c) if c.is_empty() => break,
                    Some(c) => c,
                    None => break,
                },
            };
            // One write for everything already queued.
            let more = matches!(rx.len(), 1..);
            if !more {
                if wr.write_all(&first).await.is_err() {
                    break;
                }
                continue;
            }
            batch.clear();
            batch.extend_from_slice(&first);
            while let Ok(m) = rx.try_recv() {
                batch.extend_from_slice(&m);
                if batch.len() > 64 * 1024 {
                    break;
                }
            }
            if wr.write_all(&batch).await.is_err() {
                break;
            }
        }
    });
    let ack = server_frame(OP_TEXT, ACK);
    'read: loop {
        while let Some((op, hdr, len)) = net::frame_at(&buf) {
            let reply = match op {
                OP_TEXT => Some(ack.clone()),
                OP_PING => {
                    let mask = [buf[hdr - 4], buf[hdr - 3], buf[hdr - 2], buf[hdr - 1]];
                    let payload: Vec<u8> = buf[hdr..hdr + len]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ mask[i % 4])
                        .collect();
                    Some(server_frame(OP_PONG, &payload))
                }
                OP_CLOSE => {
                    let _ = ctl_tx
                        .send(server_frame(OP_CLOSE, &1000u16.to_be_bytes()))
                        .await;
                    break 'read;
                }
                _ => None,
            };
            buf.advance(hdr + len);
            if let Some(r) = reply
                && ctl_tx.send(r).await.is_err()
            {
                break 'read;
            }
        }
        buf.reserve(1024);
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = ctl_tx.send(Bytes::new()).await;
    let _ = writer.await;
    Ok(())
}
