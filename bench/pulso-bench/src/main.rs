//! `pulso-bench`: load scenarios for pulso and the servers it is compared
//! with (see `docs/performance.md`). Every scenario prints one JSON line on
//! stdout and a readable table on stderr. Load goes to loopback only.

mod churn;
mod clients;
mod fanout;
mod idle;
mod limit;
mod measure;
mod net;
mod report;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pulso::auth::Signer;

use clients::{Proto, Target};

#[derive(Parser, Debug)]
#[command(
    name = "pulso-bench",
    version,
    about = "Load scenarios for pulso and its baselines"
)]
struct Cli {
    /// Runtime worker threads of the tool.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone, Debug)]
struct TargetArgs {
    /// The server: `127.0.0.1:PORT` or `http://127.0.0.1:PORT` (loopback
    /// only). Publishes go here, and clients connect here unless
    /// --client-url says otherwise.
    #[arg(long, default_value = "127.0.0.1:8080")]
    url: String,
    /// Servers the clients connect to, comma-separated, round-robin: client
    /// i connects to the (i mod n)-th (nodes of a cluster, say). Publishes
    /// still go to --url. Default: --url.
    #[arg(long, value_delimiter = ',')]
    client_url: Vec<String>,
    /// HS256 secret to sign client and publisher tokens with.
    #[arg(long, env = "PULSO_JWT_SECRET", default_value = "bench-secret")]
    secret: String,
    /// A name for the server in the output (`pulso`, `node`, `limit`).
    #[arg(long, default_value = "pulso")]
    label: String,
    /// Reader tasks driving the clients.
    #[arg(long, default_value_t = 4)]
    groups: usize,
    /// Connections set up at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Connections per source address (127.0.0.1, .2, …).
    #[arg(long, default_value_t = 20_000)]
    per_ip: usize,
    /// Socket.IO clients start with long-polling and upgrade to WebSocket,
    /// as socket.io-client does by default, instead of opening a WebSocket
    /// at once.
    #[arg(long)]
    sio_upgrade: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// /ws clients subscribed to topics; messages published over HTTP.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// The same with Socket.IO clients (`/notifications`, `get` auth, rooms
    /// `assistant_<k>`), published with /api/broadcast.
    SioFanout {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// Open N idle connections: connect rate, failures, server RSS per connection.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        args: idle::IdleArgs,
        /// Protocol of the idle clients.
        #[arg(long, value_enum, default_value_t = Proto::Ws)]
        proto: Proto,
    },
    /// Clients connecting and leaving while messages flow.
    Churn {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        args: churn::ChurnArgs,
        #[arg(long, value_enum, default_value_t = Proto::Ws)]
        proto: Proto,
    },
    /// Runs the "limit" baseline server.
    LimitServer {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
}

/// Settings every scenario uses.
pub struct Common {
    pub label: String,
    /// The HS256 secret (for scenarios that sign a token per client).
    pub secret: String,
    pub publish_token: String,
    pub groups: usize,
    pub connect_concurrency: usize,
}

pub(crate) fn resolve(url: &str) -> net::Result<SocketAddr> {
    let hostport = url
        .trim_start_matches("http://")
        .trim_start_matches("ws://")
        .trim_end_matches('/');
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| net::err(format!("bad --url {url}: {e}")))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| net::err(format!("--url {url} has no IPv4 address")))?;
    if !addr.ip().is_loopback() {
        return Err(net::err(format!(
            "refusing to load {addr}: pulso-bench only targets loopback addresses"
        )));
    }
    Ok(addr)
}

fn setup(t: &TargetArgs, proto: Proto) -> net::Result<(Target, Common)> {
    let signer = Signer::hmac(&t.secret);
    let ttl = Some(Duration::from_secs(6 * 3600));
    let client = signer
        .token("assistant", "bench", ttl, &Default::default())
        .map_err(net::err)?;
    let admin = signer
        .token("admin", "bench-publisher", ttl, &Default::default())
        .map_err(net::err)?;
    let addr = resolve(&t.url)?;
    let client_addrs = if t.client_url.is_empty() {
        vec![addr]
    } else {
        t.client_url
            .iter()
            .map(|u| resolve(u))
            .collect::<net::Result<Vec<_>>>()?
    };
    Ok((
        Target {
            addr,
            client_addrs,
            proto,
            token: client,
            per_ip: t.per_ip,
            sio_upgrade: t.sio_upgrade,
        },
        Common {
            label: t.label.clone(),
            secret: t.secret.clone(),
            publish_token: admin,
            groups: t.groups,
            connect_concurrency: t.connect_concurrency,
        },
    ))
}

async fn run(cmd: Cmd) -> net::Result<Option<serde_json::Value>> {
    Ok(Some(match cmd {
        Cmd::Fanout { target, args } => {
            let (t, c) = setup(&target, Proto::Ws)?;
            fanout::run(&t, &args, &c).await?
        }
        Cmd::SioFanout { target, args } => {
            let (t, c) = setup(&target, Proto::Sio)?;
            fanout::run(&t, &args, &c).await?
        }
        Cmd::Idle {
            target,
            args,
            proto,
        } => {
            let (t, c) = setup(&target, proto)?;
            idle::run(&t, &args, &c).await?
        }
        Cmd::Churn {
            target,
            args,
            proto,
        } => {
            let (t, c) = setup(&target, proto)?;
            churn::run(&t, &args, &c).await?
        }
        Cmd::LimitServer { listen } => {
            if !listen.ip().is_loopback() {
                return Err(net::err("the limit server listens on loopback only"));
            }
            limit::serve(listen).await?;
            return Ok(None);
        }
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let fds = net::raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pulso-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(Some(mut v)) => {
            v["tool_fd_limit"] = serde_json::json!(fds);
            report::emit(&v);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pulso-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
