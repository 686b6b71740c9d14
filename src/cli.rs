//! The command line: every setting as a global flag (with its `PULSO_*`
//! environment variable), and the verbs `run` (default), `check-config`,
//! `config-reference`, `metrics-reference` and `token` (which also checks a
//! token with `--check`). Serving is `main.rs`'s, through the public API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::auth::{Signer, Verifier};
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
        .subcommand(Command::new("metrics-reference").about("Print the metrics reference (Markdown)"))
        .subcommand(Command::new("check-config").about("Validate the configuration and print the effective settings, secrets masked"))
        .subcommand(
            Command::new("token")
                .about("Print a JWT signed with the configured jwt.secret (or --key-file), or check one (--check)")
                .arg(
                    Arg::new("check")
                        .long("check")
                        .value_name("TOKEN")
                        .conflicts_with_all(["role", "sub", "claim", "ttl", "key-file"])
                        .help("Verify TOKEN (`-`: read it from stdin) with the configured keys as the server would, print its claims and, if it would be refused, why; exit 0 when valid, 1 when refused"),
                )
                .arg(
                    Arg::new("for")
                        .long("for")
                        .value_name("ENDPOINT")
                        .requires("check")
                        .value_parser(["ws", "socketio", "api"])
                        .help("With --check: exit 1 also when the token's role is refused there (socketio: socketio.allowed_roles; api: publisher_roles)"),
                )
                .arg(Arg::new("role").long("role").required_unless_present("check").help("The `role` claim"))
                .arg(Arg::new("sub").long("sub").required_unless_present("check").help("The `sub` claim"))
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

/// What the command line asked for.
pub enum Invocation {
    /// A verb that has done its work (or a configuration error): exit.
    Exit(ExitCode),
    /// `run` (or no verb): serve with these settings, already validated.
    Serve(Layered, Box<Config>),
}

/// Reads the command line and runs every verb but `run`; the exit code is
/// 2 for invalid configuration.
pub fn parse() -> Invocation {
    let matches = command().get_matches();
    let (verb, sub) = match matches.subcommand() {
        Some((verb, sub)) => (verb, sub),
        None => ("run", &matches),
    };
    if verb == "config-reference" {
        print!("{}", crate::config::settings::reference_markdown());
        return Invocation::Exit(ExitCode::SUCCESS);
    }
    if verb == "metrics-reference" {
        print!("{}", crate::metrics::reference_markdown());
        return Invocation::Exit(ExitCode::SUCCESS);
    }
    let (config, layered) = match load(sub) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return Invocation::Exit(ExitCode::from(2));
        }
    };
    Invocation::Exit(match verb {
        "check-config" => {
            if let Some(files) = &config.tls
                && let Err(e) = crate::http::tls::check(files)
            {
                eprintln!(
                    "error: {}",
                    crate::config::ConfigError::setting(e.setting, e)
                );
                return Invocation::Exit(ExitCode::from(2));
            }
            println!("# configuration is valid; effective settings:");
            print!("{}", layered.describe());
            println!("# node_id resolves to {:?}", config.node_id);
            ExitCode::SUCCESS
        }
        "token" => match sub.get_one::<String>("check") {
            Some(t) => check_token(t, sub.get_one::<String>("for").map(String::as_str), &config),
            None => token(sub, &config),
        },
        _ => return Invocation::Serve(layered, Box::new(config)),
    })
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

/// The longest token `--check -` reads from stdin.
const MAX_TOKEN: u64 = 64 * 1024;

/// `pulso token --check TOKEN`: verifies it with the configured keys as the
/// server would, prints what it says and what it is allowed; exit 0 when
/// the server would accept it (at `endpoint`, when given), 1 when it would
/// refuse it, 2 when it cannot tell (no key, unreadable input).
fn check_token(arg: &str, endpoint: Option<&str>, config: &Config) -> ExitCode {
    use std::fmt::Write as _;
    use std::io::Read as _;

    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(2)
    };
    let token = if arg == "-" {
        let mut text = String::new();
        match std::io::stdin()
            .take(MAX_TOKEN + 1)
            .read_to_string(&mut text)
        {
            Ok(n) if n as u64 > MAX_TOKEN => {
                return fail(format!(
                    "the token on stdin is longer than {MAX_TOKEN} bytes"
                ));
            }
            Ok(_) => text,
            Err(e) => return fail(format!("cannot read the token from stdin: {e}")),
        }
    } else {
        arg.to_string()
    };
    if config.jwt.secret.is_none() && config.jwt.public_key_file.is_none() {
        return fail(
            "no key to verify with: set `jwt.secret` (--jwt-secret or PULSO_JWT_SECRET) or `jwt.public_key_file`; without either the server makes a random secret at every start".into(),
        );
    }
    let verifier = match Verifier::new(&config.jwt, config.jwt.secret.as_deref()) {
        Ok(v) => v,
        Err(e) => return fail(e.to_string()),
    };
    let inspection = verifier.inspect(&token);
    let mut out = String::new();
    if let Some(h) = &inspection.header {
        let kid = h
            .kid
            .as_deref()
            .map(|k| format!(", kid {k:?}"))
            .unwrap_or_default();
        let _ = writeln!(out, "algorithm: {:?}{kid}", h.alg);
    }
    match &inspection.claims {
        Some(claims) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let _ = writeln!(out, "claims:");
            for (k, v) in claims {
                let when = match (k.as_str(), v.as_u64()) {
                    ("exp" | "nbf" | "iat", Some(t)) => {
                        let at = i64::try_from(t)
                            .ok()
                            .and_then(|t| t.checked_mul(1000))
                            .map(crate::presence::time::rfc3339_ms);
                        let rel = if t > now {
                            format!("in {}", crate::auth::span(t - now))
                        } else {
                            format!("{} ago", crate::auth::span(now - t))
                        };
                        match at {
                            Some(at) => format!("  ({at}, {rel})"),
                            None => format!("  ({rel})"),
                        }
                    }
                    _ => String::new(),
                };
                let _ = writeln!(out, "  {k}: {v}{when}");
            }
        }
        None => {
            let _ = writeln!(out, "claims: unreadable (not a JWT)");
        }
    }
    let code = match &inspection.verdict {
        Err((error, why)) => {
            let _ = writeln!(out, "refused ({}): {why}", error.code());
            ExitCode::from(1)
        }
        Ok(id) => {
            let _ = writeln!(
                out,
                "valid: sub {:?}, role {:?}{}",
                id.sub,
                id.role,
                match id.exp {
                    Some(_) => "",
                    None => ", no expiry",
                }
            );
            let list = |roles: &[String]| roles.join(", ");
            let _ = writeln!(out, "  /ws: accepted");
            let allowed = &config.socketio.allowed_roles;
            let socketio = allowed.is_empty() || allowed.contains(&id.role);
            let publisher = config.publisher_roles.contains(&id.role);
            if socketio {
                let _ = writeln!(out, "  Socket.IO: accepted");
            } else {
                let _ = writeln!(
                    out,
                    "  Socket.IO: refused (403-1): role {:?} is not in socketio.allowed_roles ({})",
                    id.role,
                    list(allowed)
                );
            }
            if publisher {
                let _ = writeln!(out, "  HTTP API: may publish (role in publisher_roles)");
            } else {
                let _ = writeln!(
                    out,
                    "  HTTP API: refused (403): role {:?} is not in publisher_roles ({})",
                    id.role,
                    list(&config.publisher_roles)
                );
            }
            if let Some(acl) = config.acl.get(&id.role) {
                let filters = |f: &[crate::topic::Filter]| {
                    f.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")
                };
                let _ = writeln!(
                    out,
                    "  acl.{}: subscribe {}; publish {}",
                    id.role,
                    acl.subscribe.as_deref().map_or("any topic".into(), filters),
                    if acl.publish.is_empty() {
                        "nothing".into()
                    } else {
                        filters(&acl.publish)
                    }
                );
            }
            match endpoint {
                Some("socketio") if !socketio => ExitCode::from(1),
                Some("api") if !publisher => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            }
        }
    };
    print!("{out}");
    code
}

/// Logs to stderr, as `log_level` and `log_format` say.
pub fn init_logging(config: &Config) {
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

/// Says where the server listens, with sample tokens and how to use them
/// when it made up its JWT secret.
pub fn announce(server: &crate::server::Server) {
    let addr = server.local_addr();
    let tls = server.tls().is_some();
    if let Some(tokens) = server.sample_tokens() {
        tracing::warn!(
            "no jwt.secret configured: using a RANDOM secret; tokens stop working when pulso restarts"
        );
        eprintln!(
            "\n  ⚠  No jwt.secret is configured, so pulso generated a random one for this run.\n     \
             Set PULSO_JWT_SECRET (or jwt.secret in pulso.toml) for tokens that survive a restart.\n\n  \
             Sample token (role assistant, sub demo, valid 24 h):\n\n  {client}\n\n  \
             Publisher token for the HTTP API (valid 24 h):\n\n  {publisher}\n\n  \
             Try: websocat '{ws}://127.0.0.1:{port}/ws?token={client}'\n       \
             Console: {http}://127.0.0.1:{port}/#token={publisher}\n",
            client = tokens.client,
            publisher = tokens.publisher,
            port = addr.port(),
            ws = if tls { "wss" } else { "ws" },
            http = if tls { "https" } else { "http" },
        );
    }
    tracing::info!(%addr, node = %server.handle().node_id(), tls, "pulso listening");
}

/// Reloads the TLS certificate on every SIGHUP from `hangups` (a failure
/// keeps the certificate in use; `reload` logs and counts it).
pub fn reload_on_hangup(
    server: &crate::server::Server,
    hangups: Option<tokio::signal::unix::Signal>,
) {
    let Some(mut hangups) = hangups else {
        return;
    };
    let tls = server.tls().cloned();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match &tls {
                Some(tls) => {
                    tracing::info!("SIGHUP: reloading the TLS certificate");
                    let _ = tls.reload();
                }
                None => tracing::info!("SIGHUP: nothing to reload (no tls.cert_file)"),
            }
        }
    });
}

/// Listens for SIGHUP from now on: it reloads the TLS certificate, and
/// never stops the server (its default action would), TLS or not, so a
/// supervisor's reload command is safe either way.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate reload is off");
            None
        }
    }
}

/// Listens for SIGINT and SIGTERM from now on (the handlers are installed
/// when this is called, not when the future is first polled), and
/// completes on the first.
pub fn wait_for_signal() -> impl Future<Output = ()> {
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
