//! The presence store (SPEC §7) with SQLite and with a real PostgreSQL
//! (`PULSO_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`;
//! skipped with a message when unreachable). Every test uses its own node id,
//! subs and tables, so tests can run in parallel on one database.

mod common;
#[path = "support/services.rs"]
mod services;
#[path = "support/sio_client.rs"]
mod sio_client;

use std::str::FromStr;
use std::time::Duration;

use common::{SECRET, TestServer, WAIT, unique};
use serde_json::{Value, json};
use services::postgres_url;
use sio_client::SioClient;
use sqlx::Row as _;

const NS: &str = "/notifications";

fn sqlite_url() -> String {
    let dir = std::env::temp_dir().join(unique("pulso-presence"));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/presence.db", dir.display())
}

/// Direct access to the database, to check what pulso wrote.
enum Probe {
    Sqlite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
}

impl Probe {
    async fn open(url: &str) -> Probe {
        if url.starts_with("sqlite:") {
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .unwrap()
                .create_if_missing(true);
            Probe::Sqlite(sqlx::SqlitePool::connect_with(opts).await.unwrap())
        } else {
            Probe::Pg(sqlx::PgPool::connect(url).await.unwrap())
        }
    }

    async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self {
            Probe::Sqlite(p) => {
                sqlx::raw_sql(sql).execute(p).await.unwrap();
            }
            Probe::Pg(p) => {
                sqlx::raw_sql(sql).execute(p).await.unwrap();
            }
        }
    }

    /// The first column of the first row, as optional text.
    async fn text(&self, sql: &str) -> Option<String> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self {
            Probe::Sqlite(p) => sqlx::query(sql)
                .fetch_optional(p)
                .await
                .unwrap()
                .and_then(|r| r.try_get::<Option<String>, _>(0).unwrap()),
            Probe::Pg(p) => sqlx::query(sql)
                .fetch_optional(p)
                .await
                .unwrap()
                .and_then(|r| r.try_get::<Option<String>, _>(0).unwrap()),
        }
    }

    /// Polls `sql` until it yields `want`.
    async fn until(&self, sql: &str, want: Option<&str>) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let got = self.text(sql).await;
            if got.as_deref() == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "`{sql}` gave {got:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn start(url: &str, node: &str, extra: &str) -> TestServer {
    let top = format!("database_url = \"{url}\"\nnode_id = \"{node}\"\n");
    let extra = extra.to_string();
    TestServer::start_with(move |l| {
        l.apply_toml(&common::base_toml()).unwrap();
        l.apply_toml(&top).unwrap();
        if !extra.is_empty() {
            l.apply_toml(&extra).unwrap();
        }
    })
    .await
}

async fn get_json(srv: &TestServer, path: &str, bearer: Option<&str>) -> (u16, Value) {
    common::get_json(&srv.url(path), bearer).await
}

/// `GET /api/presence` filtered by sub, polled until `check` holds.
async fn presence_until(
    srv: &TestServer,
    sub: &str,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let admin = srv.token("admin", "presence-admin");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get_json(srv, &format!("/api/presence?sub={sub}"), Some(&admin)).await;
        // 503 while the store is still connecting at start-up.
        assert!(status == 200 || status == 503, "{status} {body}");
        let rows = body["sockets"].as_array().cloned().unwrap_or_default();
        if status == 200 && check(&rows) {
            return rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn rows_follow_sockets(url: &str) {
    let node = unique("node");
    let srv = start(url, &node, "").await;
    let (a, t) = (unique("a"), unique("t"));

    let mut first = SioClient::connect(srv.addr, 4, NS).await;
    first.auth(&srv.token("assistant", &a), json!({})).await;
    let rows = presence_until(&srv, &a, "the socket.io row", |r| r.len() == 1).await;
    let row = &rows[0];
    assert_eq!(row["role"], "assistant");
    assert_eq!(row["sub"], a.as_str());
    assert_eq!(row["socket_id"], json!(first.socket_id()));
    assert_eq!(row["protocol"], "socketio");
    assert_eq!(row["node"], node.as_str());
    let at = row["connected_at"].as_str().unwrap();
    assert!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );

    // /ws connections get a server-assigned socket id.
    let mut ws = srv.ws("timer", &t).await;
    let rows = presence_until(&srv, &t, "the ws row", |r| r.len() == 1).await;
    assert_eq!(rows[0]["protocol"], "ws");
    assert!(rows[0]["socket_id"].as_str().unwrap().starts_with("ws-"));

    // A newer connection of the same (role, sub) takes the row; the old one
    // closing does not erase it (EIO3 this time).
    let mut second = SioClient::connect(srv.addr, 3, NS).await;
    second.auth(&srv.token("assistant", &a), json!({})).await;
    let newer = second.socket_id();
    presence_until(&srv, &a, "the newer socket", |r| {
        r.len() == 1 && r[0]["socket_id"] == json!(newer)
    })
    .await;
    first.close().await;
    // Writes are applied in order: once a later marker shows up, the
    // clear for `first` has been applied too.
    let marker = unique("marker");
    let mut m = srv.ws("timer", &marker).await;
    presence_until(&srv, &marker, "the marker", |r| r.len() == 1).await;
    let rows = presence_until(&srv, &a, "the row to stay", |_| true).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["socket_id"], json!(newer));

    second.close().await;
    presence_until(&srv, &a, "the row cleared", |r| r.is_empty()).await;
    ws.stream.close(None).await.unwrap();
    presence_until(&srv, &t, "the ws row cleared", |r| r.is_empty()).await;
    let _ = m.stream.close(None).await;

    // Publisher auth on the endpoint; filters combine.
    let (status, body) = get_json(&srv, "/api/presence", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = get_json(&srv, "/api/presence", Some(&srv.token("timer", "x"))).await;
    assert_eq!(status, 403);
    let (status, body) = get_json(
        &srv,
        "/api/presence?role=nobody",
        Some(&srv.token("admin", "x")),
    )
    .await;
    assert_eq!((status, body), (200, json!({"sockets": []})));
    // Empty filters are no filters; both together narrow to one row.
    let marker2 = unique("marker2");
    let mut m2 = srv.ws("timer", &marker2).await;
    presence_until(&srv, &marker2, "the second marker", |r| r.len() == 1).await;
    let admin = srv.token("admin", "x");
    let (status, body) = get_json(
        &srv,
        &format!("/api/presence?role=&sub={marker2}"),
        Some(&admin),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["sockets"].as_array().map(Vec::len), Some(1), "{body}");
    let (_, body) = get_json(
        &srv,
        &format!("/api/presence?role=timer&sub={marker2}"),
        Some(&admin),
    )
    .await;
    assert_eq!(body["sockets"][0]["sub"], json!(marker2));
    let (_, body) = get_json(
        &srv,
        &format!("/api/presence?role=assistant&sub={marker2}"),
        Some(&admin),
    )
    .await;
    assert_eq!(body, json!({"sockets": []}));
    let _ = m2.stream.close(None).await;
    let (status, body) = get_json(&srv, "/api/presence?role=nobody", Some(&admin)).await;
    assert_eq!((status, body), (200, json!({"sockets": []})));
    let (status, _) = get_json(&srv, "/readyz", None).await;
    assert_eq!(status, 200);
    assert!(
        srv.metrics()
            .await
            .contains("pulso_presence_writes_total{result=\"ok\"}")
    );
}

#[tokio::test]
async fn sqlite_rows_follow_sockets_of_both_protocols() {
    rows_follow_sockets(&sqlite_url()).await;
}

#[tokio::test]
async fn postgres_rows_follow_sockets_of_both_protocols() {
    let Some(url) = postgres_url().await else {
        return;
    };
    rows_follow_sockets(&url).await;
}

async fn app_table_mode(url: &str) {
    let table = unique("app_assistants");
    let probe = Probe::open(url).await;
    probe
        .exec(&format!(
            "CREATE TABLE {table} (id INTEGER PRIMARY KEY, nick TEXT, socket_id TEXT);
             INSERT INTO {table} (id, nick) VALUES (41, 'aguila_calva'), (42, 'other');"
        ))
        .await;
    let node = unique("node");
    let srv = start(
        url,
        &node,
        &format!("[presence.entities.assistant]\ntable = \"{table}\"\nid_column = \"id\"\nsocket_column = \"socket_id\"\n"),
    )
    .await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    c.auth(&srv.token("assistant", "41"), json!({})).await;
    let id = c.socket_id();
    probe
        .until(
            &format!("SELECT socket_id FROM {table} WHERE id = 41"),
            Some(&id),
        )
        .await;
    probe
        .until(
            &format!("SELECT socket_id FROM {table} WHERE id = 42"),
            None,
        )
        .await;
    // Timers have no application table: only pulso's row.
    let mut t = SioClient::connect(srv.addr, 4, NS).await;
    t.auth(&srv.token("timer", "41"), json!({})).await;
    c.close().await;
    probe
        .until(
            &format!("SELECT socket_id FROM {table} WHERE id = 41"),
            None,
        )
        .await;
    t.close().await;
    srv.stop().await;
    probe.exec(&format!("DROP TABLE {table}")).await;
}

#[tokio::test]
async fn sqlite_application_table_mode() {
    app_table_mode(&sqlite_url()).await;
}

#[tokio::test]
async fn postgres_application_table_mode() {
    let Some(url) = postgres_url().await else {
        return;
    };
    app_table_mode(&url).await;
}

async fn startup_and_shutdown_clear_this_nodes_rows(url: &str) {
    let node = unique("node");
    let other = unique("other");
    // A first run creates the schema.
    let srv = start(url, &node, "").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let sub = unique("s");
    c.auth(&srv.token("assistant", &sub), json!({})).await;
    presence_until(&srv, &sub, "the row", |r| r.len() == 1).await;
    // Shutdown disconnects the client and clears its row.
    srv.stop().await;
    c.disconnected().await;
    let probe = Probe::open(url).await;
    probe
        .until(
            &format!("SELECT socket_id FROM pulso_presence WHERE sub = '{sub}'"),
            None,
        )
        .await;

    // Rows a crashed run of this node left behind are cleared at start-up;
    // another node's rows are not touched.
    let (mine, theirs) = (unique("stale"), unique("live"));
    probe
        .exec(&format!(
            "INSERT INTO pulso_presence (role, sub, socket_id, protocol, node, connected_at)
             VALUES ('assistant', '{mine}', 'old-socket', 'ws', '{node}', 0),
                    ('assistant', '{theirs}', 'their-socket', 'ws', '{other}', 0)"
        ))
        .await;
    let srv = start(url, &node, "").await;
    probe
        .until(
            &format!("SELECT socket_id FROM pulso_presence WHERE sub = '{mine}'"),
            None,
        )
        .await;
    assert_eq!(
        probe
            .text(&format!(
                "SELECT socket_id FROM pulso_presence WHERE sub = '{theirs}'"
            ))
            .await
            .as_deref(),
        Some("their-socket")
    );
    srv.stop().await;
    probe
        .exec(&format!(
            "DELETE FROM pulso_presence WHERE sub = '{theirs}'"
        ))
        .await;
}

#[tokio::test]
async fn sqlite_startup_and_shutdown_clear_this_nodes_rows() {
    startup_and_shutdown_clear_this_nodes_rows(&sqlite_url()).await;
}

#[tokio::test]
async fn postgres_startup_and_shutdown_clear_this_nodes_rows() {
    let Some(url) = postgres_url().await else {
        return;
    };
    startup_and_shutdown_clear_this_nodes_rows(&url).await;
}

/// With the store failing, delivery on both protocols goes on, /readyz says
/// why, and the failed writes are counted.
async fn delivery_survives_a_failing_store(url: &str) {
    let srv = start(url, &unique("node"), "").await;
    let mut sio = SioClient::connect(srv.addr, 4, NS).await;
    let ack = sio.auth(&srv.token("timer", &unique("t")), json!({})).await;
    assert_eq!(ack["statusCode"], 200);
    let mut ws = srv.ws("assistant", &unique("a")).await;
    ws.sub("timer").await;
    for i in 0..3 {
        let (status, body) = srv
            .post("/api/broadcast", json!({"rooms": "timer", "data": i}))
            .await;
        assert_eq!((status, body), (200, json!({"recipients": 2})));
        assert_eq!(sio.event().await.1, vec![json!(i)]);
        assert_eq!(ws.recv().await["payload"], json!(i));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get_json(&srv, "/readyz", None).await;
        let m = srv.metrics().await;
        if status == 503
            && body["checks"]["presence"] != "ok"
            && m.contains("pulso_presence_writes_total{result=\"failed\"}")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status} {body} {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = srv.token("admin", "x");
    let (status, body) = get_json(&srv, "/api/presence", Some(&admin)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    // Still delivering after the failures.
    let (_, body) = srv
        .post("/api/broadcast", json!({"rooms": "timer", "data": "late"}))
        .await;
    assert_eq!(body, json!({"recipients": 2}));
    assert_eq!(sio.event().await.1, vec![json!("late")]);
    let took = srv.stop().await;
    assert!(took < Duration::from_secs(12), "{took:?}");
}

#[tokio::test]
async fn read_only_sqlite_file_does_not_disturb_delivery() {
    let url = sqlite_url();
    // Create the database, then reopen it read-only (as root, file modes
    // would not stop writes; SQLite's read-only mode does).
    let srv = start(&url, &unique("node"), "").await;
    srv.until("presence ready", |gw| gw.presence.status().is_ok())
        .await;
    srv.stop().await;
    delivery_survives_a_failing_store(&format!("{url}?mode=ro")).await;
}

#[tokio::test]
async fn unreachable_postgres_does_not_disturb_delivery() {
    delivery_survives_a_failing_store("postgres://postgres@127.0.0.1:1/nothing").await;
}

#[tokio::test]
async fn database_url_errors_name_the_setting() {
    let mut l = pulso::config::Layered::defaults();
    l.set_text(
        "database_url",
        "mysql://x".into(),
        pulso::config::Source::Env,
    )
    .unwrap();
    let e = pulso::config::Config::from_layered(&l).unwrap_err();
    assert!(e.0.contains("`database_url`"), "{e}");
    let mut l = pulso::config::Layered::defaults();
    l.apply_toml("[presence.entities.assistant]\ntable = \"users; drop table x\"\n")
        .unwrap();
    let e = pulso::config::Config::from_layered(&l).unwrap_err();
    assert!(e.0.contains("`presence.entities.assistant.table`"), "{e}");
    let _ = SECRET;
}

#[tokio::test]
async fn one_bad_application_table_does_not_sink_other_writes() {
    let url = sqlite_url();
    let srv = start(
        &url,
        &unique("node"),
        "[presence.entities.timer]\ntable = \"no_such_table\"\n",
    )
    .await;
    let (a, t) = (unique("a"), unique("t"));
    // Both writes may land in one batch; the timer's fails, the assistant's must not.
    let (mut ca, mut ct) = (
        SioClient::connect(srv.addr, 4, NS).await,
        SioClient::connect(srv.addr, 4, NS).await,
    );
    let (ta, tt) = (srv.token("assistant", &a), srv.token("timer", &t));
    let (ack_a, ack_t) = tokio::join!(ca.auth(&ta, json!({})), ct.auth(&tt, json!({})));
    assert_eq!(
        (ack_a["statusCode"].clone(), ack_t["statusCode"].clone()),
        (json!(200), json!(200))
    );
    presence_until(&srv, &a, "the assistant row", |r| r.len() == 1).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !srv
        .metrics()
        .await
        .contains("pulso_presence_writes_total{result=\"failed\"} 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            srv.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        presence_until(&srv, &t, "no timer row", |_| true)
            .await
            .is_empty()
    );
}

/// A TCP proxy in front of PostgreSQL that can be "stopped" (every open
/// connection cut, new ones dropped at once) and started again.
struct Switch {
    port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// New connections are accepted and then never answered.
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Switch {
    async fn start(upstream: std::net::SocketAddr) -> Switch {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hang = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (d, h, c) = (down.clone(), hang.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: the "server" is gone
                }
                if h.load(Ordering::SeqCst) {
                    // A server that takes the connection and never answers.
                    tokio::spawn(async move {
                        let mut sink = [0u8; 1024];
                        while let Ok(n) =
                            tokio::io::AsyncReadExt::read(&mut inbound, &mut sink).await
                        {
                            if n == 0 {
                                break;
                            }
                        }
                    });
                    continue;
                }
                let mut cut_rx = c.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Switch {
            port,
            down,
            hang,
            cut,
        }
    }

    fn stop(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn resume(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts open connections; new ones hang unanswered.
    fn freeze(&self) {
        self.hang.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }
}

#[tokio::test]
async fn postgres_stopped_while_running_does_not_disturb_delivery_and_recovers() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let (switch, proxied_url) = proxy_to(&url).await;
    let srv = start(&proxied_url, &unique("node"), "").await;
    let (a, b, c) = (unique("a"), unique("b"), unique("c"));

    let mut sa = SioClient::connect(srv.addr, 4, NS).await;
    sa.auth(&srv.token("timer", &a), json!({})).await;
    presence_until(&srv, &a, "a's row", |r| r.len() == 1).await;

    switch.stop();
    let mut sb = SioClient::connect(srv.addr, 3, NS).await;
    assert_eq!(
        sb.auth(&srv.token("timer", &b), json!({})).await["statusCode"],
        200
    );
    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": "timer", "data": "while down"}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"recipients": 2})));
    assert_eq!(sa.event().await.1, vec![json!("while down")]);
    assert_eq!(sb.event().await.1, vec![json!("while down")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get_json(&srv, "/readyz", None).await;
        if status == 503
            && srv
                .metrics()
                .await
                .contains("pulso_presence_writes_total{result=\"failed\"}")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While the store is down, `a` leaves: its clear is lost with the
    // outage, like `b`'s set. Both must be right once the store is back.
    drop(sa);
    srv.until("a gone from the hub", |gw| gw.hub.stats().connections == 1)
        .await;

    switch.resume();
    // The store reconnects with backoff; then this node's rows are rewritten.
    let admin = srv.token("admin", "x");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (sa_status, a_rows) =
            get_json(&srv, &format!("/api/presence?sub={a}"), Some(&admin)).await;
        let (sb_status, b_rows) =
            get_json(&srv, &format!("/api/presence?sub={b}"), Some(&admin)).await;
        let rows = |v: &Value| v["sockets"].as_array().map(Vec::len);
        if (sa_status, sb_status) == (200, 200)
            && rows(&a_rows) == Some(0)
            && rows(&b_rows) == Some(1)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a: {sa_status} {a_rows}; b: {sb_status} {b_rows}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sc = SioClient::connect(srv.addr, 4, NS).await;
    sc.auth(&srv.token("timer", &c), json!({})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let admin = srv.token("admin", "x");
        let (status, body) = get_json(&srv, &format!("/api/presence?sub={c}"), Some(&admin)).await;
        let (ready, _) = get_json(&srv, "/readyz", None).await;
        if status == 200 && body["sockets"].as_array().is_some_and(|r| r.len() == 1) && ready == 200
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{status} {body} ready={ready}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.stop().await;
}

/// A [`Switch`] in front of the PostgreSQL at `url`, and the URL through it.
async fn proxy_to(url: &str) -> (Switch, String) {
    let opts = sqlx::postgres::PgConnectOptions::from_str(url).unwrap();
    let upstream = tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let switch = Switch::start(upstream).await;
    // The same URL (credentials, database, options) with the proxy as host.
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let host_start = url[scheme_end..]
        .find('@')
        .map(|i| scheme_end + i + 1)
        .unwrap_or(scheme_end);
    let host_end = url[host_start..]
        .find(['/', '?'])
        .map(|i| host_start + i)
        .unwrap_or(url.len());
    let proxied = format!(
        "{}127.0.0.1:{}{}",
        &url[..host_start],
        switch.port,
        &url[host_end..]
    );
    (switch, proxied)
}

#[tokio::test]
async fn a_hung_store_fills_the_bounded_queue_and_delivery_goes_on() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let (switch, proxied_url) = proxy_to(&url).await;
    let srv = start(&proxied_url, &unique("node"), "[presence]\nqueue = 64\n").await;
    srv.until("presence ready", |gw| gw.presence.status().is_ok())
        .await;
    let mut sio = SioClient::connect(srv.addr, 4, NS).await;
    sio.auth(&srv.token("timer", &unique("t")), json!({})).await;

    switch.freeze();
    // A socket that connects and leaves before its row is written: one
    // queued write, not two (nothing runs in between on this runtime).
    let brief = pulso::presence::Holder {
        role: "load".into(),
        sub: unique("brief"),
        socket_id: "brief-1".into(),
        protocol: "ws",
    };
    let _ = srv.gw.presence.set(brief.clone());
    srv.gw.presence.clear(brief);
    let m = srv.metrics().await;
    assert!(m.contains("pulso_presence_coalesced_total 1\n"), "{m}");
    // Far more writes than the queue holds, while the writer is stuck on a
    // database that never answers: the surplus is dropped, never waited for.
    let started = std::time::Instant::now();
    for i in 0..(64 + 1000) {
        let _ = srv.gw.presence.set(pulso::presence::Holder {
            role: "load".into(),
            sub: format!("{i}"),
            socket_id: format!("s{i}"),
            protocol: "ws",
        });
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let m = srv.metrics().await;
    assert!(
        m.contains("pulso_presence_writes_total{result=\"dropped\"}"),
        "{m}"
    );
    let (status, body) = srv
        .post("/api/broadcast", json!({"rooms": "timer", "data": "still"}))
        .await;
    assert_eq!((status, body), (200, json!({"recipients": 1})));
    assert_eq!(sio.event().await.1, vec![json!("still")]);
    // Stopping gives up on the stuck store within shutdown_timeout.
    let took = srv.stop().await;
    assert!(took < Duration::from_secs(15), "{took:?}");
}

/// Read your writes (SPEC §7): a client told "authenticated" (the Socket.IO
/// success ack, a `/ws` connection's first reply) finds its row at once, in
/// `GET /api/presence` and in the application's table. Many clients connect
/// together and each reads presence once, the instant its answer arrives:
/// no polling, so a row written after the answer fails the test.
async fn read_your_writes(url: &str) {
    let table = unique("app_timers");
    let probe = Probe::open(url).await;
    probe
        .exec(&format!(
            "CREATE TABLE {table} (id TEXT PRIMARY KEY, socket_id TEXT)"
        ))
        .await;
    let node = unique("node");
    let srv = start(
        url,
        &node,
        &format!("[presence.entities.timer]\ntable = \"{table}\"\nid_column = \"id\"\nsocket_column = \"socket_id\"\n"),
    )
    .await;
    srv.until("presence ready", |gw| gw.presence.status().is_ok())
        .await;
    let admin = srv.token("admin", "ryw-admin");
    let subs: Vec<String> = (0..48).map(|_| unique("ryw")).collect();
    for sub in &subs {
        probe
            .exec(&format!("INSERT INTO {table} (id) VALUES ('{sub}')"))
            .await;
    }
    let clients = subs.iter().enumerate().map(|(i, sub)| {
        let (srv, admin, probe, table) = (&srv, &admin, &probe, &table);
        async move {
            let token = srv.token("timer", sub);
            // Each client stays connected until its row has been checked.
            let (socket_id, _ws, _sio) = match i % 4 {
                // /ws: the first reply comes once the row is committed.
                0 => {
                    let mut ws = common::WsClient::connect(&srv.ws_url(&token)).await;
                    let pong = ws.request(json!({"type": "ping"}), 1).await;
                    assert_eq!(pong["type"], "pong");
                    (None, Some(ws), None)
                }
                // Socket.IO, both engine versions, both namespaces.
                n => {
                    let (eio, ns) = [(4, NS), (3, NS), (4, "/")][n - 1];
                    let mut c = SioClient::connect(srv.addr, eio, ns).await;
                    let ack = c.auth(&token, json!({})).await;
                    assert_eq!(ack["statusCode"], 200, "{ack}");
                    (Some(c.socket_id()), None, Some(c))
                }
            };
            let (status, body) =
                get_json(srv, &format!("/api/presence?sub={sub}"), Some(admin)).await;
            assert_eq!(status, 200, "{body}");
            let rows = body["sockets"].as_array().cloned().unwrap_or_default();
            assert_eq!(
                rows.len(),
                1,
                "{sub}: the row is there when the answer is: {body}"
            );
            let cell = probe
                .text(&format!("SELECT socket_id FROM {table} WHERE id = '{sub}'"))
                .await;
            assert_eq!(cell.as_deref(), rows[0]["socket_id"].as_str(), "{sub}");
            if let Some(id) = socket_id {
                assert_eq!(rows[0]["socket_id"], json!(id));
            }
        }
    });
    futures_util::future::join_all(clients).await;
    srv.stop().await;
    probe.exec(&format!("DROP TABLE {table}")).await;
}

#[tokio::test]
async fn sqlite_a_client_reads_its_presence_row_when_answered() {
    read_your_writes(&sqlite_url()).await;
}

#[tokio::test]
async fn postgres_a_client_reads_its_presence_row_when_answered() {
    let Some(url) = postgres_url().await else {
        return;
    };
    read_your_writes(&url).await;
}

/// The value of one series in a metrics exposition (0 when absent).
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Overload: with a small `presence.queue`, a flood of presence writes
/// overflows the queue again and again and the writer reconciles this
/// node's rows each time, while clients connect and leave over real
/// sockets and another task polls `GET /api/presence`. Every poll lists
/// every client connected throughout (a reconciliation never hides a row
/// that is right, whatever its size), and once the flood is over the rows
/// are exactly the live connections.
async fn overflow_never_hides_rows_from_readers(url: &str) {
    const STABLE: usize = 300;
    let node = unique("node");
    let srv = start(url, &node, "[presence]\nqueue = 32\n").await;
    srv.until("presence ready", |gw| gw.presence.status().is_ok())
        .await;
    let admin = srv.token("admin", "overflow-admin");

    // Clients connected throughout: more rows than one transaction of a
    // reconciliation writes. Every tenth on Socket.IO, the rest on /ws.
    let subs: Vec<String> = (0..STABLE).map(|_| unique("stable")).collect();
    let clients = futures_util::future::join_all(subs.iter().enumerate().map(|(i, sub)| {
        let srv = &srv;
        async move {
            let token = srv.token("timer", sub);
            if i.is_multiple_of(10) {
                let mut c = SioClient::connect(srv.addr, 4, NS).await;
                assert_eq!(c.auth(&token, json!({})).await["statusCode"], 200);
                (Some(c.socket_id()), None, Some(c))
            } else {
                let mut ws = common::WsClient::connect(&srv.ws_url(&token)).await;
                assert_eq!(ws.request(json!({"type": "ping"}), 1).await["type"], "pong");
                (None, Some(ws), None)
            }
        }
    }))
    .await;
    let expected: std::collections::BTreeMap<String, Option<String>> = subs
        .iter()
        .zip(&clients)
        .map(|(sub, (id, _, _))| (sub.clone(), id.clone()))
        .collect();
    // This node's rows of role `timer`: sub → socket id.
    let ours = {
        let (url, admin, node) = (
            srv.url("/api/presence?role=timer"),
            admin.clone(),
            node.clone(),
        );
        move || {
            let (url, admin, node) = (url.clone(), admin.clone(), node.clone());
            async move {
                let (status, body) = common::get_json(&url, Some(&admin)).await;
                assert_eq!(status, 200, "{body}");
                body["sockets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["node"] == json!(node))
                    .map(|r| {
                        let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                        (s("sub"), s("socket_id"))
                    })
                    .collect::<std::collections::BTreeMap<String, String>>()
            }
        }
    };
    let deadline = std::time::Instant::now() + WAIT;
    while ours().await.len() < STABLE {
        assert!(std::time::Instant::now() < deadline, "the clients' rows");
        tokio::task::yield_now().await;
    }

    // The reader: every poll must list every stable client.
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = tokio::spawn({
        let (ours, stop, stable) = (ours.clone(), stop.clone(), expected.clone());
        async move {
            let (mut polls, mut partial) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                let rows = ours().await;
                let seen = stable.keys().filter(|s| rows.contains_key(*s)).count();
                if seen != stable.len() {
                    partial.push(seen);
                }
                polls += 1;
            }
            (polls, partial)
        }
    });

    // Churn over real sockets meanwhile.
    let churn = tokio::spawn({
        let (addr, stop) = (srv.addr, stop.clone());
        let token = move |sub: &str| common::token("timer", sub, Some(Duration::from_secs(3600)));
        async move {
            let mut n = 0u32;
            while !stop.is_cancelled() {
                let sub = unique("churn");
                if n.is_multiple_of(2) {
                    let mut ws =
                        common::WsClient::connect(&format!("ws://{addr}/ws?token={}", token(&sub)))
                            .await;
                    ws.request(json!({"type": "ping"}), 1).await;
                    let _ = ws.stream.close(None).await;
                } else {
                    let mut c = SioClient::connect(addr, 4, NS).await;
                    c.auth(&token(&sub), json!({})).await;
                    c.close().await;
                }
                n += 1;
            }
            n
        }
    });

    // The flood: bursts of writes far beyond the queue, each (role, sub)
    // set and then cleared, until the writer has reconciled several times.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut rounds = 0u32;
    loop {
        let holders: Vec<pulso::presence::Holder> = (0..500)
            .map(|i| pulso::presence::Holder {
                role: "load".into(),
                sub: format!("{node}-{rounds}-{i}"),
                socket_id: format!("load-{rounds}-{i}"),
                protocol: "ws",
            })
            .collect();
        for h in &holders {
            let _ = srv.gw.presence.set(h.clone());
        }
        tokio::task::yield_now().await;
        for h in holders {
            srv.gw.presence.clear(h);
        }
        tokio::task::yield_now().await;
        rounds += 1;
        let m = srv.metrics().await;
        if series(&m, "pulso_presence_resyncs_total{result=\"ok\"}") >= 4.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rounds} rounds without 4 reconciliations:\n{m}"
        );
    }
    stop.cancel();
    let churned = churn.await.unwrap();
    let (polls, partial) = reader.await.unwrap();
    let m = srv.metrics().await;
    eprintln!(
        "{rounds} rounds, {churned} churned connections, {polls} polls; dropped {}, coalesced {}, reconciliations {}",
        series(&m, "pulso_presence_writes_total{result=\"dropped\"}"),
        series(&m, "pulso_presence_coalesced_total"),
        series(&m, "pulso_presence_resyncs_total{result=\"ok\"}"),
    );
    assert!(
        partial.is_empty(),
        "{} of {polls} polls listed only part of the {STABLE} rows: {partial:?}",
        partial.len()
    );
    assert!(polls >= 10, "{polls} polls");
    assert!(series(&m, "pulso_presence_writes_total{result=\"dropped\"}") > 0.0);
    assert!(series(&m, "pulso_presence_coalesced_total") > 0.0, "{m}");

    // Once it is over: exactly the live connections, and nothing queued.
    let want: std::collections::BTreeMap<String, Option<String>> = expected;
    let deadline = std::time::Instant::now() + WAIT * 2;
    loop {
        let rows = ours().await;
        let (_, all) = common::get_json(&srv.url("/api/presence?role=load"), Some(&admin)).await;
        let load_rows = all["sockets"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["node"] == json!(node)).count());
        let matches = rows.len() == want.len()
            && want.iter().all(|(sub, id)| {
                rows.get(sub)
                    .is_some_and(|got| id.as_ref().is_none_or(|id| id == got))
            });
        let m = srv.metrics().await;
        if matches && load_rows == 0 && series(&m, "pulso_presence_queue") == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows {} (want {}), load rows {load_rows}, queue {}",
            rows.len(),
            want.len(),
            series(&m, "pulso_presence_queue")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(clients);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_overflow_never_hides_rows_from_readers() {
    overflow_never_hides_rows_from_readers(&sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_overflow_never_hides_rows_from_readers() {
    let Some(url) = postgres_url().await else {
        return;
    };
    overflow_never_hides_rows_from_readers(&url).await;
}
