//! SQL for the presence store. The same statements run on SQLite and
//! PostgreSQL (`$n` placeholders, `ON CONFLICT … DO UPDATE`, `CAST(… AS
//! TEXT)`), so each operation is written once and run on either pool.
//!
//! Only runtime `query()` is used (no `query!` macros), so building needs no
//! database. Identifiers from configuration (application tables) were
//! validated as plain SQL identifiers and are double-quoted here.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Row as _};

use super::Holder;
use crate::config::EntityTable;

/// One queued write.
pub enum Write<'a> {
    /// The row (role, sub) now holds this socket, since `at` (ms).
    Set(&'a Holder, u64),
    /// Clear the row (role, sub) if it holds a socket of this node's.
    Vacate(&'a str, &'a str),
}

/// One row that holds a socket, as `GET /api/presence` shows it.
pub type Row = crate::gateway::PresenceRow;

#[derive(Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

/// The schema, as ordered migrations. Append new ones; never edit old ones
/// (their checksums are recorded). The bookkeeping table is pulso's own so
/// it never collides with the application's migrations in a shared database.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "presence table",
        "CREATE TABLE IF NOT EXISTS pulso_presence (
        role TEXT NOT NULL,
        sub TEXT NOT NULL,
        socket_id TEXT,
        protocol TEXT,
        node TEXT,
        connected_at BIGINT,
        PRIMARY KEY (role, sub)
    );
    CREATE INDEX IF NOT EXISTS pulso_presence_node ON pulso_presence (node);",
    ),
    (
        2,
        "cluster node heartbeats",
        // One row per live cluster node. `instance` tells this run of a
        // node from an earlier or a duplicate one; `ttl_ms` is the node's
        // own `cluster.node_ttl`, so it is judged by the clock it promised.
        // Times are milliseconds on the database's clock.
        "CREATE TABLE IF NOT EXISTS pulso_nodes (
        node TEXT PRIMARY KEY,
        instance TEXT NOT NULL,
        cluster TEXT NOT NULL,
        connections BIGINT NOT NULL,
        seen_at BIGINT NOT NULL,
        started_at BIGINT NOT NULL,
        ttl_ms BIGINT NOT NULL
    );",
    ),
];

const MIGRATIONS_TABLE: &str = "_pulso_migrations";

fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                (*description).into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(*sql),
                false,
            )
        })
        .collect();
    let mut m = Migrator::with_migrations(migrations);
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    // Migrations only add. A node of the previous version (a rolling
    // upgrade of a cluster, or a rollback) must keep working against the
    // schema a newer node already migrated, instead of refusing it.
    m.set_ignore_missing(true);
    m
}

/// Runs `$body` with `$pool` bound to whichever pool this is.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Pg($pool) => $body,
        }
    };
}

fn quote(ident: &str) -> String {
    // Validated at configuration time (letters, digits, `_`, one optional
    // `schema.`), so quoting each part is enough.
    ident
        .split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

fn app_set_sql(t: &EntityTable) -> String {
    format!(
        "UPDATE {} SET {} = $1 WHERE CAST({} AS TEXT) = $2",
        quote(&t.table),
        quote(&t.socket_column),
        quote(&t.id_column)
    )
}

/// Clears an application-table cell that holds the socket this node's
/// presence row for (`role` = `$2`, `sub` = `$1`) holds: run before that row
/// is vacated.
fn app_vacate_sql(t: &EntityTable) -> String {
    format!(
        "UPDATE {} SET {} = NULL WHERE CAST({} AS TEXT) = $1 AND {} IN (
           SELECT socket_id FROM pulso_presence
           WHERE role = $2 AND sub = $1 AND node = $3 AND socket_id IS NOT NULL)",
        quote(&t.table),
        quote(&t.socket_column),
        quote(&t.id_column),
        quote(&t.socket_column)
    )
}

fn app_clear_sql(t: &EntityTable) -> String {
    format!(
        "UPDATE {} SET {} = NULL WHERE CAST({} AS TEXT) = $1 AND {} = $2",
        quote(&t.table),
        quote(&t.socket_column),
        quote(&t.id_column),
        quote(&t.socket_column)
    )
}

/// Most rows one statement writes: 6 parameters a row stays far below
/// SQLite's (32 766) and PostgreSQL's (65 535) limits.
const ROWS_PER_STATEMENT: usize = 256;

/// How many writes from the start of `writes` one statement takes: a run of
/// the same kind, at most [`ROWS_PER_STATEMENT`], each (role, sub) once (an
/// upsert may not touch one row twice).
fn run_len<'a>(writes: &'a [Write<'a>]) -> usize {
    fn key<'a>(w: &'a Write<'a>) -> (&'a str, &'a str, bool) {
        match w {
            Write::Set(h, _) => (h.role.as_str(), h.sub.as_str(), true),
            Write::Vacate(role, sub) => (role, sub, false),
        }
    }
    let Some(first) = writes.first() else {
        return 0;
    };
    let kind = key(first).2;
    let mut seen = std::collections::HashSet::new();
    writes
        .iter()
        .take(ROWS_PER_STATEMENT)
        .map(key)
        .take_while(|&(role, sub, k)| k == kind && seen.insert((role, sub)))
        .count()
}

/// Upserts `n` rows: parameters role, sub, socket id, protocol, node,
/// connected_at for each.
fn set_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO pulso_presence (role, sub, socket_id, protocol, node, connected_at) VALUES ",
    );
    for i in 0..n {
        let b = i * 6;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${}, ${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6
        ));
    }
    sql.push_str(
        " ON CONFLICT (role, sub) DO UPDATE SET socket_id = excluded.socket_id,
       protocol = excluded.protocol, node = excluded.node, connected_at = excluded.connected_at",
    );
    sql
}

/// Clears the rows (role, sub) of `n` pairs that hold a socket of node
/// `$1`: parameters node, then role and sub for each.
fn vacate_sql(n: usize) -> String {
    let mut sql = String::from(
        "UPDATE pulso_presence SET socket_id = NULL
     WHERE node = $1 AND socket_id IS NOT NULL AND (role, sub) IN (VALUES ",
    );
    for i in 0..n {
        let b = 2 + i * 2;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(${}, ${})", b, b + 1));
    }
    sql.push(')');
    sql
}

/// The rows a node holds, for clearing their application-table cells.
const HELD_SQL: &str =
    "SELECT role, sub, socket_id FROM pulso_presence WHERE node = $1 AND socket_id IS NOT NULL";

const CLEAR_NODE_SQL: &str =
    "UPDATE pulso_presence SET socket_id = NULL WHERE node = $1 AND socket_id IS NOT NULL";

/// Clears every row `$node` holds, and the application-table cells that
/// still hold those sockets, inside the open transaction `$tx`; evaluates
/// to the number of presence rows cleared (`?` on errors). A macro rather
/// than a function: the same statements run on either engine's
/// transaction type.
macro_rules! clear_node_in {
    ($tx:ident, $node:expr, $entities:expr) => {{
        if !$entities.is_empty() {
            let rows = sqlx::query(HELD_SQL)
                .bind($node)
                .fetch_all(&mut *$tx)
                .await?;
            for row in rows {
                let role: String = row.try_get(0)?;
                let sub: String = row.try_get(1)?;
                let socket: String = row.try_get(2)?;
                if let Some(t) = $entities.get(&role) {
                    sqlx::query(AssertSqlSafe(app_clear_sql(t)))
                        .bind(&sub)
                        .bind(&socket)
                        .execute(&mut *$tx)
                        .await?;
                }
            }
        }
        sqlx::query(CLEAR_NODE_SQL)
            .bind($node)
            .execute(&mut *$tx)
            .await?
            .rows_affected()
    }};
}

impl Db {
    pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL + NORMAL: durable across a process crash, one fsync
                // per checkpoint rather than per write.
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(2));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(3))
                .connect_with(opts)
                .await?;
            Ok(Db::Sqlite(pool))
        } else {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(3))
                .connect_with(opts)
                .await?;
            Ok(Db::Pg(pool))
        }
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let m = migrator();
        on_pool!(self, pool => m.run(pool).await)
    }

    /// Applies several writes in one transaction (one fsync for a burst of
    /// connects and disconnects), in order, as few statements as it can:
    /// each run of writes of one kind is one statement (up to
    /// [`ROWS_PER_STATEMENT`] rows), plus a statement per application-table
    /// cell.
    pub async fn write_batch(
        &self,
        node: &str,
        entities: &HashMap<String, EntityTable>,
        writes: &[Write<'_>],
    ) -> Result<(), sqlx::Error> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut rest = writes;
            while !rest.is_empty() {
                let n = run_len(rest);
                let (run, tail) = rest.split_at(n);
                rest = tail;
                match run[0] {
                    Write::Set(..) => {
                        let mut q = sqlx::query(AssertSqlSafe(set_sql(run.len())));
                        for w in run {
                            if let Write::Set(h, at_ms) = w {
                                let at = i64::try_from(*at_ms).unwrap_or(i64::MAX);
                                q = q
                                    .bind(&h.role)
                                    .bind(&h.sub)
                                    .bind(&h.socket_id)
                                    .bind(h.protocol)
                                    .bind(node)
                                    .bind(at);
                            }
                        }
                        q.execute(&mut *tx).await?;
                        for w in run {
                            if let Write::Set(h, _) = w
                                && let Some(t) = entities.get(&h.role)
                            {
                                sqlx::query(AssertSqlSafe(app_set_sql(t)))
                                    .bind(&h.socket_id)
                                    .bind(&h.sub)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                        }
                    }
                    Write::Vacate(..) => {
                        // The application cells first: they are found
                        // through the rows about to be vacated.
                        for w in run {
                            if let Write::Vacate(role, sub) = w
                                && let Some(t) = entities.get(*role)
                            {
                                sqlx::query(AssertSqlSafe(app_vacate_sql(t)))
                                    .bind(*sub)
                                    .bind(*role)
                                    .bind(node)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                        }
                        let mut q = sqlx::query(AssertSqlSafe(vacate_sql(run.len()))).bind(node);
                        for w in run {
                            if let Write::Vacate(role, sub) = w {
                                q = q.bind(*role).bind(*sub);
                            }
                        }
                        q.execute(&mut *tx).await?;
                    }
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The rows `node` holds: (role, sub, socket id).
    pub async fn held(&self, node: &str) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        let rows = on_pool!(self, pool => {
            let rows = sqlx::query(HELD_SQL).bind(node).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
            }
            out
        });
        Ok(rows)
    }

    /// Clears every row `node` holds (and the matching application-table
    /// cells), in one transaction; returns how many presence rows were
    /// cleared.
    pub async fn clear_node(
        &self,
        node: &str,
        entities: &HashMap<String, EntityTable>,
    ) -> Result<u64, sqlx::Error> {
        let n = on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let n = clear_node_in!(tx, node, entities);
            tx.commit().await?;
            n
        });
        Ok(n)
    }

    pub async fn list(
        &self,
        role: Option<&str>,
        sub: Option<&str>,
    ) -> Result<Vec<Row>, sqlx::Error> {
        // NULL filters match everything; the casts give PostgreSQL the
        // parameter types it cannot infer from `$1 IS NULL`.
        let sql = "SELECT role, sub, socket_id, protocol, node, connected_at FROM pulso_presence
             WHERE socket_id IS NOT NULL
               AND (CAST($1 AS TEXT) IS NULL OR role = $1)
               AND (CAST($2 AS TEXT) IS NULL OR sub = $2)
             ORDER BY role, sub
             LIMIT 10000";
        let rows = on_pool!(self, pool => {
            let rows = sqlx::query(sql).bind(role).bind(sub).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let at: Option<i64> = r.try_get(5)?;
                out.push(Row {
                    role: r.try_get(0)?,
                    sub: r.try_get(1)?,
                    socket_id: r.try_get(2)?,
                    protocol: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                    node: r.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
                    connected_at: super::time::rfc3339_ms(at.unwrap_or(0)),
                });
            }
            out
        });
        Ok(rows)
    }
}

/// Milliseconds since the Unix epoch on PostgreSQL's clock. Heartbeats are
/// written and judged with this one clock, never a node's own: nodes whose
/// clocks disagree still agree on who has been silent for how long.
/// `clock_timestamp()` rather than `now()`: a statement that waited on a
/// lock judges with the time it runs, not the time its transaction began.
macro_rules! pg_now_ms {
    () => {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    };
}

/// A cluster node as its heartbeat row names it.
#[derive(Debug, Clone)]
pub struct Member {
    pub node: String,
    /// This run of the node (random): tells it from an earlier run, or from
    /// another process started with the same `node_id`.
    pub instance: String,
    /// `cluster.prefix`: a node lists (`GET /api/cluster`) and judges the
    /// nodes of its own cluster only, whoever else shares the database.
    /// Node ids are unique across the whole database all the same: the
    /// presence rows are keyed by node id.
    pub cluster: String,
    /// `cluster.node_ttl`, in ms.
    pub ttl_ms: i64,
}

/// The outcome of claiming a node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The heartbeat row is this instance's now.
    Claimed,
    /// Another instance's heartbeat, not expired, holds the node id.
    Held {
        /// When it was last written (database clock, ms).
        seen_at: i64,
        /// How old it was when read.
        age_ms: i64,
        /// How long it may stay silent before it is expired.
        ttl_ms: i64,
    },
}

/// One live node, as `GET /api/cluster` shows it.
pub type NodeRow = crate::gateway::NodeRow;

/// Takes the node id: inserts the heartbeat row, or takes it over when it
/// is this instance's own (a reconnection) or expired (an earlier run that
/// died). A live row of another instance is left alone (no row returned).
const CLAIM_SQL: &str = concat!(
    "INSERT INTO pulso_nodes AS n (node, instance, cluster, connections, seen_at, started_at, ttl_ms)
     VALUES ($1, $2, $3, $4, ",
    pg_now_ms!(),
    ", ",
    pg_now_ms!(),
    ", $5)
     ON CONFLICT (node) DO UPDATE SET instance = excluded.instance, cluster = excluded.cluster,
       connections = excluded.connections, seen_at = excluded.seen_at, ttl_ms = excluded.ttl_ms,
       started_at = CASE WHEN n.instance = excluded.instance THEN n.started_at
                         ELSE excluded.started_at END
     WHERE n.instance = excluded.instance OR n.seen_at + n.ttl_ms < excluded.seen_at
     RETURNING node"
);

const HOLDER_SQL: &str = concat!(
    "SELECT seen_at, ",
    pg_now_ms!(),
    " - seen_at, ttl_ms FROM pulso_nodes WHERE node = $1"
);

/// A heartbeat: only this instance's row. No row updated means it is gone
/// (this node was judged dead and cleared) or another instance took it.
const BEAT_SQL: &str = concat!(
    "UPDATE pulso_nodes SET seen_at = ",
    pg_now_ms!(),
    ", connections = $3 WHERE node = $1 AND instance = $2"
);

/// Takes (locks and deletes) up to 32 expired heartbeat rows of one
/// cluster, judged on the database's clock by each row's own `ttl_ms`.
/// `SKIP LOCKED`: nodes cleaning at once take different rows, never the
/// same one twice; the lock re-checks the expiry, so a node whose heartbeat
/// just came back is not taken.
const DEAD_SQL: &str = concat!(
    "DELETE FROM pulso_nodes WHERE node IN (
       SELECT node FROM pulso_nodes
       WHERE cluster = $2 AND node <> $1 AND seen_at + ttl_ms < ",
    pg_now_ms!(),
    "
       ORDER BY seen_at LIMIT 32 FOR UPDATE SKIP LOCKED)
     RETURNING node"
);

const LEAVE_SQL: &str = "DELETE FROM pulso_nodes WHERE node = $1 AND instance = $2";

const NODES_SQL: &str = concat!(
    "SELECT node, instance, connections, seen_at FROM pulso_nodes
     WHERE cluster = $1 AND seen_at + ttl_ms >= ",
    pg_now_ms!(),
    "
     ORDER BY node LIMIT 1000"
);

impl Db {
    /// Heartbeats need the shared PostgreSQL a cluster is configured with
    /// (a cluster on SQLite is refused at configuration time).
    fn pg(&self) -> Result<&PgPool, sqlx::Error> {
        match self {
            Db::Pg(pool) => Ok(pool),
            Db::Sqlite(_) => Err(sqlx::Error::Configuration(
                "cluster heartbeats need PostgreSQL".into(),
            )),
        }
    }

    /// Claims `m.node` for this instance (see [`CLAIM_SQL`]).
    pub async fn claim(&self, m: &Member, connections: i64) -> Result<Claim, sqlx::Error> {
        let pool = self.pg()?;
        // A row deleted between the claim and the look at its holder (a
        // node cleaning it as dead) is claimed on the next round.
        for _ in 0..3 {
            let claimed = sqlx::query(CLAIM_SQL)
                .bind(&m.node)
                .bind(&m.instance)
                .bind(&m.cluster)
                .bind(connections)
                .bind(m.ttl_ms)
                .fetch_optional(pool)
                .await?;
            if claimed.is_some() {
                return Ok(Claim::Claimed);
            }
            if let Some(row) = sqlx::query(HOLDER_SQL)
                .bind(&m.node)
                .fetch_optional(pool)
                .await?
            {
                return Ok(Claim::Held {
                    seen_at: row.try_get(0)?,
                    age_ms: row.try_get(1)?,
                    ttl_ms: row.try_get(2)?,
                });
            }
        }
        Err(sqlx::Error::Protocol(
            "the heartbeat row kept changing while it was claimed".into(),
        ))
    }

    /// Records a heartbeat; `false` when this instance no longer holds its
    /// row (see [`BEAT_SQL`]).
    pub async fn beat(&self, m: &Member, connections: i64) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(BEAT_SQL)
            .bind(&m.node)
            .bind(&m.instance)
            .bind(connections)
            .execute(self.pg()?)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Removes the heartbeats of dead nodes of `m`'s cluster (never `m`
    /// itself) and clears their presence rows and application-table cells,
    /// in one transaction: rows
    /// are cleared only for a node whose heartbeat is deleted with them, so
    /// a node that came back keeps its rows, and one that comes back after
    /// finds its heartbeat gone and writes its rows again. Returns each
    /// node cleaned with the number of presence rows it held.
    pub async fn clear_dead(
        &self,
        m: &Member,
        entities: &HashMap<String, EntityTable>,
    ) -> Result<Vec<(String, u64)>, sqlx::Error> {
        let mut tx = self.pg()?.begin().await?;
        let dead: Vec<String> = sqlx::query(DEAD_SQL)
            .bind(&m.node)
            .bind(&m.cluster)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut cleaned = Vec::with_capacity(dead.len());
        for node in dead {
            let n = clear_node_in!(tx, &node, entities);
            cleaned.push((node, n));
        }
        tx.commit().await?;
        Ok(cleaned)
    }

    /// Clears this node's rows and removes its heartbeat, in one
    /// transaction (a graceful stop); returns the presence rows cleared.
    /// Were the heartbeat removed without the rows, nobody would clear them.
    pub async fn leave(
        &self,
        m: &Member,
        entities: &HashMap<String, EntityTable>,
    ) -> Result<u64, sqlx::Error> {
        let mut tx = self.pg()?.begin().await?;
        let n = clear_node_in!(tx, &m.node, entities);
        sqlx::query(LEAVE_SQL)
            .bind(&m.node)
            .bind(&m.instance)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// The live nodes of `m.cluster` (at most 1 000), by node id.
    pub async fn nodes(&self, m: &Member) -> Result<Vec<NodeRow>, sqlx::Error> {
        let rows = sqlx::query(NODES_SQL)
            .bind(&m.cluster)
            .fetch_all(self.pg()?)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let node: String = r.try_get(0)?;
            let instance: String = r.try_get(1)?;
            out.push(NodeRow {
                this: node == m.node && instance == m.instance,
                node,
                connections: r.try_get(2)?,
                seen_at: super::time::rfc3339_ms(r.try_get(3)?),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(sub: &str) -> Holder {
        Holder {
            role: "r".into(),
            sub: sub.into(),
            socket_id: format!("s-{sub}"),
            protocol: "ws",
        }
    }

    #[test]
    fn a_statement_takes_a_run_of_one_kind_each_row_once_and_at_most_its_limit() {
        let (a, b) = (holder("a"), holder("b"));
        let w = [
            Write::Set(&a, 1),
            Write::Set(&b, 1),
            Write::Vacate("r", "c"),
            Write::Vacate("r", "d"),
            Write::Vacate("r", "c"),
        ];
        assert_eq!(run_len(&w), 2);
        assert_eq!(run_len(&w[2..]), 2);
        assert_eq!(run_len(&w[4..]), 1);
        assert_eq!(run_len(&w[5..]), 0);
        let many: Vec<Holder> = (0..600).map(|i| holder(&i.to_string())).collect();
        let sets: Vec<Write<'_>> = many.iter().map(|h| Write::Set(h, 1)).collect();
        assert_eq!(run_len(&sets), ROWS_PER_STATEMENT);
        assert!(set_sql(2).contains("($1, $2, $3, $4, $5, $6), ($7, $8, $9, $10, $11, $12) ON"));
        assert!(vacate_sql(2).ends_with("IN (VALUES ($2, $3), ($4, $5))"));
    }
}
