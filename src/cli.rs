//! The command line: every setting as a global flag (with its `PULSO_*`
//! environment variable), and the verbs `run` (default), `check-config` and
//! `token`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::auth::Signer;
use crate::config::value::{Raw, parse_duration};
use crate::config::{Config, Kind, Layered, SETTINGS, Source};

pub fn command() -> Command {
    let mut cmd = Command::new("pulso")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A real-time gateway: WebSocket and Socket.IO clients, JWT auth, topics and rooms, MQTT bridge, presence")
        .after_help("Settings are read from flags, PULSO_* environment variables, a TOML file (--config, or ./pulso.toml) and defaults, highest first.")
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .global(true)
                .env("PULSO_CONFIG")
                .help("TOML configuration file [default: ./pulso.toml when present]"),
        )
        .subcommand(Command::new("run").about("Serve (the default when no verb is given)"))
        .subcommand(Command::new("config-reference").about("Print the configuration reference (Markdown)"))
        .subcommand(Command::new("check-config").about("Validate the configuration and print the effective settings, secrets masked"))
        .subcommand(
            Command::new("token")
                .about("Print a JWT signed with the configured jwt.secret (or --key-file)")
                .arg(Arg::new("role").long("role").required(true).help("The `role` claim"))
                .arg(Arg::new("sub").long("sub").required(true).help("The `sub` claim"))
                .arg(
                    Arg::new("claim")
                        .long("claim")
                        .value_name("K=V")
                        .action(ArgAction::Append)
                        .help("Extra claim; V is parsed as JSON when it can be (tournamentId=2 is a number)"),
                )
                .arg(Arg::new("ttl").long("ttl").default_value("1h").help("Lifetime; 0 for a token without exp"))
                .arg(
                    Arg::new("key-file")
                        .long("key-file")
                        .value_name("PEM")
                        .help("Sign with this RSA/EC/Ed25519 private key instead of jwt.secret"),
                ),
        );
    for s in SETTINGS {
        let default = s
            .default
            .filter(|d| !d.is_empty())
            .map(|d| format!(" [default: {d}]"))
            .unwrap_or_default();
        cmd = cmd.arg(
            Arg::new(s.name)
                .long(s.flag())
                .env(s.env())
                .hide_env_values(s.kind == Kind::Secret)
                .value_name(s.kind.placeholder())
                .global(true)
                .help_heading("Settings")
                .help(format!("{} (`{}`){default}", s.help, s.name)),
        );
    }
    cmd
}

/// Reads every source into one effective configuration.
pub fn load(matches: &ArgMatches) -> Result<(Config, Layered), crate::config::ConfigError> {
    let file = matches.get_one::<String>("config").map(PathBuf::from);
    let mut layered = Layered::new(file.as_deref())?;
    for s in SETTINGS {
        let source = match matches.value_source(s.name) {
            Some(ValueSource::CommandLine) => Source::Flag,
            Some(ValueSource::EnvVariable) => Source::Env,
            _ => continue,
        };
        if let Some(v) = matches.get_one::<String>(s.name) {
            layered.set_text(s.name, v.clone(), source)?;
        }
    }
    let config = Config::from_layered(&layered)?;
    Ok((config, layered))
}

/// Runs the command line; the exit code is 2 for invalid configuration, and
/// for a cluster node whose `node_id` a live node holds (starting again
/// unchanged cannot help either way).
pub fn main() -> ExitCode {
    let matches = command().get_matches();
    let (verb, sub) = match matches.subcommand() {
        Some((verb, sub)) => (verb, sub),
        None => ("run", &matches),
    };
    if verb == "config-reference" {
        print!("{}", crate::config::settings::reference_markdown());
        return ExitCode::SUCCESS;
    }
    let (config, layered) = match load(sub) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match verb {
        "check-config" => {
            println!("# configuration is valid; effective settings:");
            print!("{}", layered.describe());
            println!("# node_id resolves to {:?}", config.node_id);
            ExitCode::SUCCESS
        }
        "token" => token(sub, &config),
        _ => serve(config),
    }
}

fn token(m: &ArgMatches, config: &Config) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(2)
    };
    let signer = match m.get_one::<String>("key-file") {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => match Signer::private_pem(&pem) {
                Some(s) => s,
                None => {
                    return fail(format!(
                        "{path} is not an RSA, EC or Ed25519 private key in PEM"
                    ));
                }
            },
            Err(e) => return fail(format!("cannot read {path}: {e}")),
        },
        None => match &config.jwt.secret {
            Some(secret) => Signer::hmac(secret),
            None => {
                return fail(
                    "no key to sign with: set `jwt.secret` (--jwt-secret or PULSO_JWT_SECRET) or pass --key-file".into(),
                );
            }
        },
    };
    let ttl = match m
        .get_one::<String>("ttl")
        .map(|t| parse_duration(&Raw::Text(t.clone())))
    {
        Some(Ok(d)) if d.is_zero() => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => return fail(format!("--ttl: {e}")),
        None => Some(Duration::from_secs(3600)),
    };
    let mut claims = serde_json::Map::new();
    for kv in m.get_many::<String>("claim").into_iter().flatten() {
        let Some((k, v)) = kv.split_once('=') else {
            return fail(format!("--claim `{kv}`: expected K=V"));
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        claims.insert(k.to_string(), value);
    }
    let role = m
        .get_one::<String>("role")
        .map(String::as_str)
        .unwrap_or_default();
    let sub = m
        .get_one::<String>("sub")
        .map(String::as_str)
        .unwrap_or_default();
    if let Some(iss) = &config.jwt.issuer {
        claims.entry("iss").or_insert_with(|| iss.clone().into());
    }
    if let Some(aud) = &config.jwt.audience {
        claims.entry("aud").or_insert_with(|| aud.clone().into());
    }
    match signer.token(role, sub, ttl, &claims) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("cannot sign: {e}")),
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (stderr closed by a supervisor that
    // went away) is dropped: by default the subscriber reports the failure
    // with `eprintln!`, which then panics, and a panic in the task that
    // waits for SIGTERM would leave the server unable to stop.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match config.log_format {
        crate::config::LogFormat::Json => builder.json().init(),
        crate::config::LogFormat::Text => builder.init(),
    }
}

fn serve(config: Config) -> ExitCode {
    init_logging(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Before anything listens: a SIGTERM from the moment clients can
        // connect stops the server gracefully.
        let signalled = wait_for_signal();
        let server = match crate::server::Server::bind(config).await {
            Ok(s) => s,
            Err(
                e @ (crate::server::StartError::Config(_)
                | crate::server::StartError::NodeInUse(_)),
            ) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = server.local_addr();
        if let Some(tokens) = server.sample_tokens() {
            tracing::warn!(
                "no jwt.secret configured: using a RANDOM secret; tokens stop working when pulso restarts"
            );
            eprintln!(
                "\n  ⚠  No jwt.secret is configured, so pulso generated a random one for this run.\n     \
                 Set PULSO_JWT_SECRET (or jwt.secret in pulso.toml) for tokens that survive a restart.\n\n  \
                 Sample token (role assistant, sub demo, valid 24 h):\n\n  {client}\n\n  \
                 Publisher token for the HTTP API (valid 24 h):\n\n  {publisher}\n\n  \
                 Try: websocat 'ws://127.0.0.1:{port}/ws?token={client}'\n       \
                 or open http://127.0.0.1:{port}/?token={client}\n",
                client = tokens.client,
                publisher = tokens.publisher,
                port = addr.port()
            );
        }
        tracing::info!(%addr, node = %server.gateway().config.node_id, "pulso listening");
        let stop = server.shutdown_token();
        tokio::spawn(async move {
            signalled.await;
            // Stop first: nothing after this may keep the server running.
            stop.cancel();
            tracing::info!("signal received");
        });
        match server.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Listens for SIGINT and SIGTERM from now on (the handlers are installed
/// when this is called, not when the future is first polled), and
/// completes on the first.
fn wait_for_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let streams = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        match streams {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
