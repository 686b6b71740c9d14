//! Real networks for fault tests: network namespaces joined to this one by
//! veth pairs (iproute2's `ip`), a link emulator on one of them (delay,
//! random loss, a cut), and `tc tbf` rate limits.
//!
//! The emulator does what `tc netem` does, in user space, for kernels built
//! without `sch_netem`: the link between the host and the clients'
//! namespace runs through a third namespace where two `AF_PACKET` sockets
//! forward every Ethernet frame from one veth to the other, each frame
//! dropped with the loss probability or held for the delay. TCP sends only
//! single-segment frames on these links (`gso_max_segs 1`), and the
//! emulator fills in the TCP checksums the sending veth left to "hardware".
//!
//! Needs root and `ip netns`; [`Lab::new`] prints why it skips otherwise
//! (fails under `PULSO_REQUIRE_SERVICES=1`). Namespaces are named
//! `pft<pid>x<n>…` and deleted when the [`Lab`] is dropped, on failure too;
//! ones left by a killed test process are deleted by the next one.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

use super::common;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`; the error says what failed and why.
pub fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A network namespace of the lab.
#[derive(Clone, Debug)]
pub struct Ns {
    pub name: String,
    /// This namespace's address on its link to the host.
    pub ip: Ipv4Addr,
    /// The host's address on that link (where the server listens).
    pub host_ip: Ipv4Addr,
    /// The host side of the link (for `tc`).
    pub host_if: String,
}

impl Ns {
    /// A TCP socket in this namespace (created on a thread that entered
    /// it; the socket stays there whichever thread then uses it).
    pub fn tcp_socket(&self) -> std::io::Result<TcpSocket> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path)?;
            TcpSocket::new_v4()
        })
        .join()
        .map_err(|_| std::io::Error::other("socket thread panicked"))?
    }

    /// The server at `port` on the host, as seen from this namespace.
    pub fn server(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.host_ip, port))
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on a valid descriptor of a network namespace; it
    // changes only the calling thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The knobs of an emulated link, changed while it runs.
#[derive(Default)]
pub struct Impairment {
    /// One-way delay in each direction, in microseconds.
    delay_us: AtomicU64,
    /// Loss probability in each direction, in parts per million.
    loss_ppm: AtomicU32,
    stop: AtomicBool,
    /// Frames forwarded and dropped (both directions).
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Frames the kernel refused to send (too large, say).
    pub send_errors: AtomicU64,
}

/// An emulated link between the host and a namespace.
pub struct Link {
    pub ns: Ns,
    knobs: Arc<Impairment>,
}

impl Link {
    /// Delay each frame by `delay` in each direction and drop it with
    /// probability `loss` (0.0–1.0), like `tc netem delay D loss L` on both
    /// ends.
    pub fn set(&self, delay: Duration, loss: f64) {
        self.knobs
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        self.knobs
            .loss_ppm
            .store((loss.clamp(0.0, 1.0) * 1e6) as u32, Ordering::Relaxed);
    }

    /// Drops every frame from now on (the cable is cut).
    pub fn cut(&self) {
        self.knobs.loss_ppm.store(1_000_000, Ordering::Relaxed);
    }

    /// A clean link again.
    pub fn restore(&self) {
        self.set(Duration::ZERO, 0.0);
    }

    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.knobs.forwarded.load(Ordering::Relaxed),
            self.knobs.dropped.load(Ordering::Relaxed),
            self.knobs.send_errors.load(Ordering::Relaxed),
        )
    }
}

/// The namespaces and links of one test; dropping it removes them.
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
    knobs: Vec<Arc<Impairment>>,
    threads: Vec<JoinHandle<()>>,
    links: u32,
}

impl Lab {
    /// A new lab, or `None` (with the reason printed) when this process may
    /// not create network namespaces.
    pub fn new() -> Option<Lab> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            common::skip("fault tests need root (network namespaces, veth, tc)");
            return None;
        }
        clear_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let lab = Lab {
            tag: format!("pft{}x{n}", std::process::id()),
            namespaces: Vec::new(),
            knobs: Vec::new(),
            threads: Vec::new(),
            links: 0,
        };
        let probe = format!("{}p", lab.tag);
        if let Err(e) = ip(&["netns", "add", &probe]) {
            common::skip(&format!("`ip netns` is unavailable here: {e}"));
            return None;
        }
        let _ = ip(&["netns", "del", &probe]);
        Some(lab)
    }

    fn add_ns(&mut self, suffix: &str) -> Result<String, String> {
        let name = format!("{}{suffix}", self.tag);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A free /30 for link `k`: host .1, namespace .2.
    fn subnet(&self, k: u32) -> Result<(Ipv4Addr, Ipv4Addr), String> {
        let routes = output("ip", &["-4", "route", "show"]);
        for attempt in 0..64u32 {
            let seed = std::process::id()
                .wrapping_mul(7)
                .wrapping_add(attempt * 131 + k * 17);
            let (b, c) = (200 + (seed % 50) as u8, ((seed / 50) % 64 * 4) as u8);
            let net = Ipv4Addr::new(10, b, c, 0);
            if !routes.contains(&format!("{net}/30")) {
                return Ok((Ipv4Addr::new(10, b, c, 1), Ipv4Addr::new(10, b, c, 2)));
            }
        }
        Err("no free 10.200-249.x.x/30 subnet".into())
    }

    /// A namespace on a direct veth link to the host; with `rate_kbit`, a
    /// `tc tbf` on the host side limits what the host sends it.
    pub fn direct(&mut self, rate_kbit: Option<u32>) -> Result<Ns, String> {
        let k = self.links;
        self.links += 1;
        let ns = self.add_ns(&format!("d{k}"))?;
        let (host_ip, ns_ip) = self.subnet(k)?;
        let (h, n) = (format!("{}h{k}", self.tag), format!("{}n{k}", self.tag));
        ip(&[
            "link", "add", &h, "type", "veth", "peer", "name", &n, "netns", &ns,
        ])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &h])?;
        ip(&["link", "set", &h, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{ns_ip}/30"), "dev", &n])?;
        ip(&["-n", &ns, "link", "set", &n, "up"])?;
        if let Some(kbit) = rate_kbit {
            let rate = format!("{kbit}kbit");
            run(
                "tc",
                &[
                    "qdisc", "add", "dev", &h, "root", "tbf", "rate", &rate, "burst", "1600",
                    "latency", "200ms",
                ],
            )?;
        }
        Ok(Ns {
            name: ns,
            ip: ns_ip,
            host_ip,
            host_if: h,
        })
    }

    /// A namespace linked to the host through the emulator (see the module
    /// documentation); the link starts clean.
    pub fn emulated(&mut self) -> Result<Link, String> {
        let k = self.links;
        self.links += 1;
        let mid = self.add_ns(&format!("m{k}"))?;
        let ns = self.add_ns(&format!("c{k}"))?;
        let (host_ip, ns_ip) = self.subnet(k)?;
        let t = &self.tag;
        // host h <-> mh [mid] mc <-> n [ns]
        let (h, mh, mc, n) = (
            format!("{t}h{k}"),
            format!("{t}a{k}"),
            format!("{t}b{k}"),
            format!("{t}n{k}"),
        );
        ip(&[
            "link", "add", &h, "type", "veth", "peer", "name", &mh, "netns", &mid,
        ])?;
        ip(&[
            "-n", &mid, "link", "add", &mc, "type", "veth", "peer", "name", &n, "netns", &ns,
        ])?;
        for (netns, dev) in [
            (None, &h),
            (Some(&mid), &mh),
            (Some(&mid), &mc),
            (Some(&ns), &n),
        ] {
            let mut args: Vec<&str> = Vec::new();
            if let Some(netns) = netns {
                args.extend(["-n", netns.as_str()]);
            }
            args.extend(["link", "set", dev.as_str(), "gso_max_segs", "1", "up"]);
            ip(&args)?;
        }
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &h])?;
        ip(&["-n", &ns, "addr", "add", &format!("{ns_ip}/30"), "dev", &n])?;

        let knobs = Arc::new(Impairment::default());
        let path = format!("/var/run/netns/{mid}");
        let (mh2, mc2) = (mh.clone(), mc.clone());
        let sockets = std::thread::spawn(move || -> std::io::Result<(OwnedFd, OwnedFd)> {
            enter(&path)?;
            Ok((packet_socket(&mh2)?, packet_socket(&mc2)?))
        })
        .join()
        .map_err(|_| "packet socket thread panicked".to_string())?
        .map_err(|e| format!("AF_PACKET sockets in {mid}: {e}"))?;
        let (a, b) = sockets;
        let (a, b) = (Arc::new(a), Arc::new(b));
        self.threads
            .extend(forward(a.clone(), b.clone(), knobs.clone()));
        self.threads.extend(forward(b, a, knobs.clone()));
        self.knobs.push(knobs.clone());
        Ok(Link {
            ns: Ns {
                name: ns,
                ip: ns_ip,
                host_ip,
                host_if: h,
            },
            knobs,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for k in &self.knobs {
            k.stop.store(true, Ordering::Relaxed);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Deleting a namespace deletes its veths, their peers on the host
        // and the qdiscs on them.
        for ns in self.namespaces.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cleaning up: {e}");
            }
        }
    }
}

/// Deletes namespaces left by lab processes that no longer run.
fn clear_stale() {
    for line in output("ip", &["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("pft")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

// ---- the emulator ----------------------------------------------------------

const ETH_P_ALL: u16 = 0x0003;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// A raw packet socket bound to `ifname` (in the calling thread's
/// namespace), receiving what arrives on it and not what is sent.
fn packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let last = std::io::Error::last_os_error;
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: plain libc calls on a descriptor we own, with correctly
    // sized arguments.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            ETH_P_ALL.to_be() as libc::c_int,
        );
        if fd < 0 {
            return Err(last());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(last());
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = index as i32;
        if libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(last());
        }
        let one: libc::c_int = 1;
        // Best effort: frames we send are also skipped by their pkttype.
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        ) != 0
        {
            return Err(last());
        }
        Ok(fd)
    }
}

/// One direction: a thread reads frames from `from`, drops or timestamps
/// them; another sends them to `to` when due (first in, first out).
fn forward(from: Arc<OwnedFd>, to: Arc<OwnedFd>, knobs: Arc<Impairment>) -> [JoinHandle<()>; 2] {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let k = knobs.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !k.stop.load(Ordering::Relaxed) {
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom into our buffer and address, sizes given.
            let n = unsafe {
                libc::recvfrom(
                    from.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n <= 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue; // timeout (to look at `stop`), or our own frame
            }
            let loss = k.loss_ppm.load(Ordering::Relaxed);
            if loss > 0 && rand::random_range(0..1_000_000u32) < loss {
                k.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut frame = buf[..n as usize].to_vec();
            fix_tcp_checksum(&mut frame);
            let due = Instant::now() + Duration::from_micros(k.delay_us.load(Ordering::Relaxed));
            if tx.send((due, frame)).is_err() {
                break;
            }
        }
    });
    let sender = std::thread::spawn(move || {
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((due, frame)) => {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    // SAFETY: send of our buffer on a bound packet socket.
                    let sent = unsafe {
                        libc::send(
                            to.as_raw_fd(),
                            frame.as_ptr() as *const libc::c_void,
                            frame.len(),
                            0,
                        )
                    };
                    if sent < 0 {
                        knobs.send_errors.fetch_add(1, Ordering::Relaxed);
                    } else {
                        knobs.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if knobs.stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    [reader, sender]
}

/// Computes the TCP checksum of an IPv4/TCP Ethernet frame (the sending
/// veth leaves it to an offload that a frame copied by a packet socket
/// never gets).
fn fix_tcp_checksum(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 || f[23] != 6 {
        return;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let (start, end) = (14 + ihl, 14 + total);
    if total < ihl + 20 || end > f.len() {
        return;
    }
    f[start + 16] = 0;
    f[start + 17] = 0;
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from_be_bytes([pair[0], 0])
            };
            sum += word as u32;
        }
    };
    add(&f[26..34]); // source and destination addresses
    add(&[0, 6]);
    add(&((total - ihl) as u16).to_be_bytes());
    add(&f[start..end]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    f[start + 16..start + 18].copy_from_slice(&c.to_be_bytes());
}
