//! The `pulso` binary: flags, environment, TOML, check-config, token, and a
//! real process started with no configuration at all (the quickstart).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::WsClient;
use pulso::auth::Verifier;
use pulso::config::Config;

fn pulso() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pulso"));
    // A clean slate: no PULSO_* from the caller, and no ./pulso.toml.
    for (k, _) in std::env::vars() {
        if k.starts_with("PULSO_") {
            c.env_remove(k);
        }
    }
    c.current_dir(std::env::temp_dir());
    c
}

fn run(c: &mut Command) -> (i32, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_setting_with_flag_and_env() {
    let (code, out, _) = run(pulso().arg("--help"));
    assert_eq!(code, 0);
    for s in pulso::config::SETTINGS {
        assert!(
            out.contains(&format!("--{}", s.flag())),
            "--help lacks --{}",
            s.flag()
        );
        assert!(out.contains(&s.env()), "--help lacks {}", s.env());
    }
}

#[test]
fn check_config_applies_precedence_and_masks_secrets() {
    let dir = tempdir();
    let file = dir.join("p.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:7000\"\n[ws]\nrate_limit = 10\nmax_subscriptions = 11\n[jwt]\nsecret = \"file-secret\"\n").unwrap();
    let (code, out, err) = run(pulso()
        .args(["check-config", "--config"])
        .arg(&file)
        .args(["--ws-rate-limit", "30"])
        .env("PULSO_WS_RATE_LIMIT", "20")
        .env("PULSO_WS_MAX_SUBSCRIPTIONS", "12")
        .env("PULSO_AUTO_SUBSCRIBE", "a,b/#"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen = \"127.0.0.1:7000\"  # file"), "{out}");
    assert!(out.contains("ws.rate_limit = 30  # flag"), "{out}");
    assert!(out.contains("ws.max_subscriptions = 12  # env"), "{out}");
    assert!(
        out.contains("auto_subscribe = [\"a\", \"b/#\"]  # env"),
        "{out}"
    );
    assert!(out.contains("jwt.secret = \"********\"  # file"), "{out}");
    assert!(!out.contains("file-secret"));
    assert!(out.contains("ws.outbound_queue = 1024  # default"), "{out}");
}

#[test]
fn pulso_toml_in_the_working_directory_is_read() {
    let dir = tempdir();
    std::fs::write(dir.join("pulso.toml"), "node_id = \"from-cwd\"\n").unwrap();
    let (code, out, _) = run(pulso().arg("check-config").current_dir(&dir));
    assert_eq!(code, 0);
    assert!(out.contains("node_id = \"from-cwd\"  # file"), "{out}");
}

#[test]
fn invalid_configuration_exits_2_naming_the_setting() {
    let dir = tempdir();
    let bad_file = dir.join("bad.toml");
    std::fs::write(&bad_file, "[ws]\nmax_mesage_size = 5\n").unwrap();
    let cases: Vec<(Command, &str)> = vec![
        (
            {
                let mut c = pulso();
                c.args(["check-config", "--ws-max-message-size", "huge"]);
                c
            },
            "ws.max_message_size",
        ),
        (
            {
                let mut c = pulso();
                c.arg("check-config")
                    .env("PULSO_KEEPALIVE_INTERVAL", "soon");
                c
            },
            "keepalive_interval",
        ),
        (
            {
                let mut c = pulso();
                c.arg("check-config").env("PULSO_LISTEN", "nowhere");
                c
            },
            "listen",
        ),
        (
            {
                let mut c = pulso();
                c.args(["check-config", "--config"]).arg(&bad_file);
                c
            },
            "ws.max_mesage_size",
        ),
        (
            {
                let mut c = pulso();
                c.args(["check-config", "--acl", "{ x = { publish = [\"a/#/b\"] } }"]);
                c
            },
            "acl.x.publish",
        ),
        (
            {
                let mut c = pulso();
                c.args(["--demo-enabled", "maybe"]);
                c
            },
            "demo.enabled",
        ),
    ];
    for (mut cmd, setting) in cases {
        let (code, _, err) = run(&mut cmd);
        assert_eq!(code, 2, "{setting}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(&format!("`{setting}`")), "{setting}: {err}");
    }
}

#[test]
fn token_command_signs_with_the_configured_secret() {
    let (code, out, err) = run(pulso()
        .args([
            "token",
            "--role",
            "assistant",
            "--sub",
            "42",
            "--claim",
            "tournamentId=2",
            "--claim",
            "name=Ana",
            "--ttl",
            "10m",
        ])
        .env("PULSO_JWT_SECRET", "cli-secret"));
    assert_eq!(code, 0, "{err}");
    let cfg = Config::defaults().jwt;
    let id = Verifier::new(&cfg, Some("cli-secret"))
        .unwrap()
        .verify(out.trim())
        .unwrap();
    assert_eq!((id.role.as_str(), id.sub.as_str()), ("assistant", "42"));
    assert_eq!(id.claims["tournamentId"], 2);
    assert_eq!(id.claims["name"], "Ana");
    let ttl = id.exp.unwrap() - id.claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 600);
    // Without a key it refuses clearly.
    let (code, _, err) = run(pulso().args(["token", "--role", "r", "--sub", "s"]));
    assert_eq!(code, 2);
    assert!(err.contains("jwt.secret"), "{err}");
}

/// Starts the binary with no configuration, reads the sample token it
/// prints, receives the demo feed with it, then stops it with SIGTERM.
#[tokio::test]
async fn quickstart_with_no_configuration() {
    let mut child = pulso()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--demo-interval",
            "100ms",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut tokens, mut addr, mut warned) = (Vec::new(), None, false);
    while tokens.len() < 2 || addr.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("startup output");
        if line.contains("RANDOM secret") {
            warned = true;
        }
        if line.trim().starts_with("eyJ") {
            tokens.push(line.trim().to_string());
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && let Some(a) = v["fields"]["addr"].as_str()
        {
            addr = Some(a.to_string());
        }
    }
    assert!(warned, "a loud warning about the random secret");
    let (client, publisher, addr) = (&tokens[0], &tokens[1], addr.unwrap());
    let mut c = WsClient::connect(&format!("ws://{addr}/ws?token={client}")).await;
    c.sub("metricas/demo").await;
    let m = c.recv().await;
    assert_eq!(m["topic"], "metricas/demo");
    assert!(m["payload"]["value"].is_number());
    // The printed publisher token works with the HTTP API; the client token does not.
    let body = serde_json::json!({"topic":"temperature","payload":{"celsius":21.5}}).to_string();
    let url = format!("http://{addr}/api/publish");
    assert_eq!(common::post_json(&url, Some(client), &body).await.0, 403);
    let (status, reply) = common::post_json(&url, Some(publisher), &body).await;
    assert_eq!((status, reply["recipients"].as_u64()), (200, Some(1)));
    loop {
        let m = c.recv().await;
        if m["topic"] == "temperature" {
            assert_eq!(m["payload"]["celsius"], 21.5);
            break;
        }
    }

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(c.close_code().await, 1001);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pulso-cli-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn docs_configuration_md_is_the_generated_reference() {
    let (code, out, _) = run(pulso().arg("config-reference"));
    assert_eq!(code, 0);
    let path = format!("{}/docs/configuration.md", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        doc == out,
        "docs/configuration.md is stale: run `cargo run -q -- config-reference > docs/configuration.md`"
    );
}

/// A supervisor that goes away closes pulso's stderr; SIGTERM must still
/// stop it (a log line that cannot be written is dropped, never a panic).
#[test]
fn sigterm_stops_pulso_even_with_its_stderr_closed() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let dir = std::env::temp_dir().join(format!("pulso-cli-stderr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pulso"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--jwt-secret", "s", "--demo-enabled", "false"])
        .args(["--database-url", "sqlite::memory:"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "pulso did not start");
        std::thread::yield_now();
    }
    drop(child.stdout.take());
    drop(child.stderr.take());
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("pulso ignored SIGTERM with its stderr closed");
        }
        std::thread::yield_now();
    };
    assert_eq!(status.code(), Some(0));
}

fn sign(secret: &str, claims: serde_json::Value) -> String {
    pulso::auth::Signer::hmac(secret)
        .sign(claims.as_object().unwrap())
        .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `token --check` with `PULSO_JWT_SECRET=check-secret` and `env`.
fn check(token: &str, env: &[(&str, &str)], extra: &[&str]) -> (i32, String, String) {
    let mut c = pulso();
    c.args(["token", "--check", token])
        .args(extra)
        .env("PULSO_JWT_SECRET", "check-secret");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

#[test]
fn token_check_accepts_a_valid_token_and_prints_its_claims_and_rights() {
    let exp = now() + 600;
    let t = sign(
        "check-secret",
        serde_json::json!({"sub":"42","role":"assistant","tournamentId":2,"exp":exp}),
    );
    let (code, out, err) = check(&t, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("algorithm: HS256"), "{out}");
    assert!(out.contains("  tournamentId: 2"), "{out}");
    assert!(out.contains(&format!("  exp: {exp}  (")), "{out}");
    assert!(
        out.contains("in 9 min") || out.contains("in 10 min"),
        "{out}"
    );
    assert!(
        out.contains("valid: sub \"42\", role \"assistant\""),
        "{out}"
    );
    assert!(out.contains("/ws: accepted"), "{out}");
    assert!(out.contains("Socket.IO: accepted"), "{out}");
    assert!(
        out.contains("HTTP API: refused (403): role \"assistant\" is not in publisher_roles"),
        "{out}"
    );
    // The same token read from stdin.
    let mut child = pulso()
        .args(["token", "--check", "-"])
        .env("PULSO_JWT_SECRET", "check-secret")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{t}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid: sub \"42\""));
}

#[test]
fn token_check_says_why_a_token_is_refused() {
    let t = now();
    // Token, extra environment, why it is refused, a claim line shown.
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            sign(
                "check-secret",
                serde_json::json!({"sub":"1","exp": t - 300}),
            ),
            vec![],
            "refused (token_expired): expired 5 min ago",
            "exp",
        ),
        (
            sign(
                "another-secret",
                serde_json::json!({"sub":"1","exp": t + 60}),
            ),
            vec![],
            "refused (invalid_token): bad signature: this HS256 token was not signed with the configured jwt.secret",
            "sub",
        ),
        (
            sign(
                "check-secret",
                serde_json::json!({"sub":"1","nbf": t + 12_600}),
            ),
            vec![],
            "refused (invalid_token): not valid yet: valid in 3 h",
            "nbf",
        ),
        (
            sign("check-secret", serde_json::json!({"sub":"1","iss":"them"})),
            vec![("PULSO_JWT_ISSUER", "us")],
            "refused (invalid_token): wrong issuer: iss is \"them\", jwt.issuer is \"us\"",
            "iss",
        ),
        (
            sign("check-secret", serde_json::json!({"sub":"1"})),
            vec![("PULSO_JWT_REQUIRE_EXP", "true")],
            "refused (invalid_token): the `exp` claim is missing, and jwt.require_exp = true requires it",
            "sub",
        ),
        (
            sign("check-secret", serde_json::json!({"sub":["a"]})),
            vec![],
            "refused (invalid_token): invalid claims: exp, nbf, iat, sub, iss or aud has the wrong type",
            "sub: [\"a\"]",
        ),
        (
            sign("check-secret", serde_json::json!({"sub":"1","role":5})),
            vec![],
            "refused (invalid_token): invalid claims: invalid token: `role` must be a string",
            "role: 5",
        ),
        (
            pulso::auth::Signer::private_pem(
                &std::fs::read(format!(
                    "{}/tests/fixtures/ec_private.pem",
                    env!("CARGO_MANIFEST_DIR")
                ))
                .unwrap(),
            )
            .unwrap()
            .token("r", "1", None, &Default::default())
            .unwrap(),
            vec![],
            "refused (invalid_token): wrong algorithm: signed with ES256, but no jwt.public_key_file is configured",
            "role",
        ),
        (
            "not.a-token".to_string(),
            vec![],
            "refused (invalid_token): malformed",
            "claims: unreadable",
        ),
    ];
    for (token, env, why, shown) in cases {
        let (code, out, err) = check(&token, &env, &[]);
        assert_eq!(code, 1, "{why}: {out}{err}");
        assert!(out.contains(why), "expected `{why}` in:\n{out}");
        assert!(out.contains(shown), "expected `{shown}` in:\n{out}");
        assert!(!out.contains("valid: "), "{out}");
    }
}

#[test]
fn token_check_for_an_endpoint_refuses_a_role_it_does_not_allow() {
    let t = sign(
        "check-secret",
        serde_json::json!({"sub":"7","role":"timer","exp": now() + 60}),
    );
    let roles = [("PULSO_SOCKETIO_ALLOWED_ROLES", "assistant,admin")];
    let (code, out, _) = check(&t, &roles, &["--for", "socketio"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Socket.IO: refused (403-1): role \"timer\" is not in socketio.allowed_roles (assistant, admin)"),
        "{out}"
    );
    // The token itself is valid: without --for, and for /ws, exit 0.
    assert_eq!(check(&t, &roles, &[]).0, 0);
    assert_eq!(check(&t, &roles, &["--for", "ws"]).0, 0);
    // No role claim at all: not a publisher.
    let no_role = sign("check-secret", serde_json::json!({"sub":"7"}));
    let (code, out, _) = check(&no_role, &[], &["--for", "api"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("HTTP API: refused (403): role \"\" is not in publisher_roles"),
        "{out}"
    );
    let admin = sign(
        "check-secret",
        serde_json::json!({"sub":"7","role":"admin"}),
    );
    let (code, out, _) = check(&admin, &[], &["--for", "api"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("HTTP API: may publish"), "{out}");
    assert!(out.contains("no expiry"), "{out}");
}

#[test]
fn token_check_uses_the_configured_public_key_and_needs_a_key() {
    let fixture = |n: &str| format!("{}/tests/fixtures/{n}", env!("CARGO_MANIFEST_DIR"));
    let t = pulso::auth::Signer::private_pem(&std::fs::read(fixture("ec_private.pem")).unwrap())
        .unwrap()
        .token(
            "assistant",
            "9",
            Some(Duration::from_secs(60)),
            &Default::default(),
        )
        .unwrap();
    let dir = tempdir();
    let file = dir.join("keys.toml");
    std::fs::write(
        &file,
        format!(
            "[jwt]\npublic_key_file = \"{}\"\n",
            fixture("ec_public.pem")
        ),
    )
    .unwrap();
    let (code, out, err) = run(pulso()
        .args(["token", "--check", &t, "--config"])
        .arg(&file));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("algorithm: ES256"), "{out}");
    assert!(out.contains("valid: sub \"9\""), "{out}");
    // An HS256 token against that configuration (no jwt.secret).
    let hs = sign("x", serde_json::json!({"sub":"1"}));
    let (code, out, _) = run(pulso()
        .args(["token", "--check", &hs, "--config"])
        .arg(&file));
    assert_eq!(code, 1);
    assert!(
        out.contains("wrong algorithm: signed with HS256 (HMAC), but no jwt.secret is configured"),
        "{out}"
    );
    // No key at all: it cannot tell, exit 2.
    let (code, _, err) = run(pulso().args(["token", "--check", &hs]));
    assert_eq!(code, 2);
    assert!(err.contains("no key to verify with"), "{err}");
    // --check signs nothing: --role with it is a usage error.
    let (code, _, _) = run(pulso()
        .args(["token", "--check", &hs, "--role", "r"])
        .env("PULSO_JWT_SECRET", "x"));
    assert_eq!(code, 2);
}

#[test]
fn docs_metrics_md_is_the_generated_reference() {
    let (code, out, _) = run(pulso().arg("metrics-reference"));
    assert_eq!(code, 0);
    let path = format!("{}/docs/metrics.md", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        doc == out,
        "docs/metrics.md is stale: run `cargo run -q -- metrics-reference > docs/metrics.md`"
    );
}
