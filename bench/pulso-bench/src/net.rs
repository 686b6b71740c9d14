//! Minimal clients: a WebSocket client that parses frames in place (no
//! allocation per message, so the tool stays cheaper than the servers it
//! measures) and a keep-alive HTTP/1.1 client for publishing and `/metrics`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

pub fn err(msg: impl Into<String>) -> Error {
    msg.into().into()
}

/// The source address for connection `i`: 127.0.0.1 for the first
/// `per_ip`, then 127.0.0.2, … so more than ~28 000 connections fit in the
/// ephemeral port range (only when the target itself is on loopback).
pub fn source_for(target: SocketAddr, i: usize, per_ip: usize) -> Option<IpAddr> {
    match target.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => {
            let n = (i / per_ip.max(1)) as u32;
            let host = 1 + n % 250;
            Some(IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(127, 0, 0, 0)) + host,
            )))
        }
        _ => None,
    }
}

/// A TCP connection from `src` (if any) with Nagle off.
pub async fn tcp(target: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(src) = src {
        // Let the kernel pick the port at connect time (4-tuple sharing),
        // instead of reserving one per bind.
        let one: libc::c_int = 1;
        // SAFETY: a valid fd and a pointer to a c_int of the given size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let stream = sock.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// Finds `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memmem::find(hay, needle)
}

/// The unsigned integer that starts at `at` in `hay`.
pub fn number_at(hay: &[u8], at: usize) -> Option<u64> {
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in hay.get(at..)? {
        if b.is_ascii_digit() {
            n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
            digits += 1;
        } else {
            break;
        }
    }
    (digits > 0).then_some(n)
}

/// A key searched for in every frame received, prepared once: a
/// vectorised search, so that the tool's cost per delivery stays small and
/// does not grow with what a server writes before the payload.
type Key = LazyLock<memmem::Finder<'static>>;

pub static SEQ_KEY: Key = LazyLock::new(|| memmem::Finder::new(b"\"seq\":"));
static K_KEY: Key = LazyLock::new(|| memmem::Finder::new(b"\"k\":"));
static SENT_KEY: Key = LazyLock::new(|| memmem::Finder::new(b"\"sent\":"));

/// Where the value after `key` starts in `hay`.
fn value_at(key: &Key, hay: &[u8]) -> Option<usize> {
    Some(key.find(hay)? + key.needle().len())
}

/// `seq`, `k` and `sent` of a bench payload
/// (`{"seq":…,"k":…,"sent":…,…}`, in that order) whose `"seq":` key is at
/// `at`: each key is looked for after the previous one only.
pub fn bench_fields(payload: &[u8], at: usize) -> Option<(u64, u64, u64)> {
    let at = at + SEQ_KEY.needle().len();
    let seq = number_at(payload, at)?;
    let rest = payload.get(at..)?;
    let k_at = value_at(&K_KEY, rest)?;
    let k = number_at(rest, k_at)?;
    let rest = rest.get(k_at..)?;
    let sent = number_at(rest, value_at(&SENT_KEY, rest)?)?;
    Some((seq, k, sent))
}

// ---------------------------------------------------------------- WebSocket

pub const OP_TEXT: u8 = 1;
pub const OP_CLOSE: u8 = 8;
pub const OP_PING: u8 = 9;
pub const OP_PONG: u8 = 10;

/// A client connection; `buf` holds bytes read but not yet parsed.
pub struct WsConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

/// One complete frame at the start of `buf`: (opcode, header length, payload length).
pub fn frame_at(buf: &[u8]) -> Option<(u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut hdr) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        hdr += 4;
    }
    (buf.len() >= hdr + len).then_some((opcode, hdr, len))
}

/// Encodes a masked client frame (mask key zero: valid, and free to apply).
pub fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    pulso::transport::frame::encode_client(out, true, opcode, payload, [0; 4]);
}

impl WsConn {
    /// TCP connect plus the HTTP upgrade to `path` (which carries the query).
    pub async fn connect(target: SocketAddr, src: Option<IpAddr>, path: &str) -> Result<WsConn> {
        let mut stream = tcp(target, src).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err(err("handshake answer too long"));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(err("connection closed during the handshake"));
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            let line = String::from_utf8_lossy(&buf[..end]);
            let line = line.lines().next().unwrap_or("").to_string();
            return Err(err(format!("upgrade refused: {line}")));
        }
        buf.advance(end);
        Ok(WsConn { stream, buf })
    }

    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        client_frame(&mut out, opcode, payload);
        self.stream.write_all(&out).await
    }

    /// The next text frame (answering pings on the way), with a timeout.
    pub async fn next_text(&mut self, wait: Duration) -> Result<Vec<u8>> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some((op, hdr, len)) = frame_at(&self.buf) {
                    let payload = self.buf[hdr..hdr + len].to_vec();
                    self.buf.advance(hdr + len);
                    match op {
                        OP_TEXT => return Ok(payload),
                        OP_PING => self.send(OP_PONG, &payload).await?,
                        OP_CLOSE => {
                            let code = payload
                                .get(..2)
                                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                                .unwrap_or(0);
                            return Err(err(format!("closed by the server ({code})")));
                        }
                        _ => {}
                    }
                    continue;
                }
                self.buf.reserve(4096);
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    return Err(err("connection closed"));
                }
            }
        })
        .await
        .map_err(|_| err("timed out waiting for a frame"))?
    }
}

// --------------------------------------------------------------------- HTTP

/// A keep-alive HTTP/1.1 connection.
pub struct Http {
    stream: TcpStream,
    buf: BytesMut,
    host: SocketAddr,
}

impl Http {
    pub async fn connect(target: SocketAddr) -> Result<Http> {
        Ok(Http {
            stream: tcp(target, None).await?,
            buf: BytesMut::with_capacity(4096),
            host: target,
        })
    }

    pub fn target(&self) -> SocketAddr {
        self.host
    }

    /// Sends one request and reads the answer: (status, body).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        let mut req = Vec::with_capacity(256 + body.len());
        req.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        if !body.is_empty() {
            req.extend_from_slice(b"Content-Type: application/json\r\n");
        }
        if let Some(token) = bearer {
            req.extend_from_slice(format!("Authorization: Bearer {token}\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        self.stream.write_all(&req).await?;

        let end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        self.buf.advance(end);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err("malformed HTTP status line"))?;
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let body = if let Some(len) = header("content-length:") {
            let len: usize = len.parse().map_err(|_| err("bad content-length"))?;
            while self.buf.len() < len {
                self.fill().await?;
            }
            self.buf.split_to(len).to_vec()
        } else if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(p) = find(&self.buf, b"\r\n") {
                        break p;
                    }
                    self.fill().await?;
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| err("bad chunk size"))?;
                self.buf.advance(line_end + 2);
                while self.buf.len() < size + 2 {
                    self.fill().await?;
                }
                body.extend_from_slice(&self.buf[..size]);
                self.buf.advance(size + 2);
                if size == 0 {
                    break body;
                }
            }
        } else {
            Vec::new()
        };
        Ok((status, body))
    }

    async fn fill(&mut self) -> Result<()> {
        self.buf.reserve(4096);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(err("HTTP connection closed"));
        }
        Ok(())
    }
}

/// Reads `/metrics` and sums every sample of each named family.
pub async fn scrape(target: SocketAddr, names: &[&str]) -> Result<Vec<f64>> {
    let mut http = Http::connect(target).await?;
    let (status, body) = http.request("GET", "/metrics", None, b"").await?;
    if status != 200 {
        return Err(err(format!("/metrics answered {status}")));
    }
    let text = String::from_utf8_lossy(&body);
    Ok(names
        .iter()
        .map(|name| {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
        .collect())
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_fields_are_read_whatever_precedes_the_payload() {
        let plain =
            br#"{"topic":"bench/t0","ts":17,"payload":{"seq":12,"k":0,"sent":99,"pad":"xx"}}"#;
        let tracked = br#"{"topic":"bench/t0","ts":17,"offset":3,"epoch":"Xc2-1","payload":{"seq":12,"k":0,"sent":99,"pad":"xx"}}"#;
        for frame in [&plain[..], &tracked[..]] {
            let at = SEQ_KEY.find(frame).unwrap();
            assert_eq!(bench_fields(frame, at), Some((12, 0, 99)));
        }
        let sio = br#"42["check_in",{"seq":5,"k":1,"sent":7,"pad":""}]"#;
        assert_eq!(
            bench_fields(sio, SEQ_KEY.find(sio).unwrap()),
            Some((5, 1, 7))
        );
        assert_eq!(bench_fields(br#"{"seq":5,"sent":7}"#, 0), None, "no k");
        assert_eq!(number_at(b"x42,", 1), Some(42));
        assert_eq!(number_at(b"x,", 1), None);
        assert_eq!(number_at(b"x", 5), None);
        assert_eq!(find(b"ab\r\ncd", b"\r\n"), Some(2));
    }
}
