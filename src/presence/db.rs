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
    /// Clear the row if it still holds this socket.
    Clear(&'a Holder),
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
const MIGRATIONS: &[(i64, &str, &str)] = &[(
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
)];

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

fn app_clear_sql(t: &EntityTable) -> String {
    format!(
        "UPDATE {} SET {} = NULL WHERE CAST({} AS TEXT) = $1 AND {} = $2",
        quote(&t.table),
        quote(&t.socket_column),
        quote(&t.id_column),
        quote(&t.socket_column)
    )
}

const SET_SQL: &str =
    "INSERT INTO pulso_presence (role, sub, socket_id, protocol, node, connected_at)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (role, sub) DO UPDATE SET socket_id = excluded.socket_id,
       protocol = excluded.protocol, node = excluded.node, connected_at = excluded.connected_at";

const CLEAR_SQL: &str =
    "UPDATE pulso_presence SET socket_id = NULL WHERE role = $1 AND sub = $2 AND socket_id = $3";

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
    /// connects and disconnects), in order.
    pub async fn write_batch(
        &self,
        node: &str,
        entities: &HashMap<String, EntityTable>,
        writes: &[Write<'_>],
    ) -> Result<(), sqlx::Error> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for w in writes {
                match w {
                    Write::Set(h, at_ms) => {
                        let at = i64::try_from(*at_ms).unwrap_or(i64::MAX);
                        sqlx::query(SET_SQL)
                            .bind(&h.role)
                            .bind(&h.sub)
                            .bind(&h.socket_id)
                            .bind(h.protocol)
                            .bind(node)
                            .bind(at)
                            .execute(&mut *tx)
                            .await?;
                        if let Some(t) = entities.get(&h.role) {
                            sqlx::query(AssertSqlSafe(app_set_sql(t)))
                                .bind(&h.socket_id)
                                .bind(&h.sub)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    Write::Clear(h) => {
                        sqlx::query(CLEAR_SQL)
                            .bind(&h.role)
                            .bind(&h.sub)
                            .bind(&h.socket_id)
                            .execute(&mut *tx)
                            .await?;
                        if let Some(t) = entities.get(&h.role) {
                            sqlx::query(AssertSqlSafe(app_clear_sql(t)))
                                .bind(&h.sub)
                                .bind(&h.socket_id)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Clears every row this node holds (and the matching application-table
    /// cells); returns how many presence rows were cleared.
    pub async fn clear_node(
        &self,
        node: &str,
        entities: &HashMap<String, EntityTable>,
    ) -> Result<u64, sqlx::Error> {
        let held = "SELECT role, sub, socket_id FROM pulso_presence WHERE node = $1 AND socket_id IS NOT NULL";
        let clear =
            "UPDATE pulso_presence SET socket_id = NULL WHERE node = $1 AND socket_id IS NOT NULL";
        let n = on_pool!(self, pool => {
            if !entities.is_empty() {
                let rows = sqlx::query(held).bind(node).fetch_all(pool).await?;
                for row in rows {
                    let role: String = row.try_get(0)?;
                    let sub: String = row.try_get(1)?;
                    let socket: String = row.try_get(2)?;
                    if let Some(t) = entities.get(&role) {
                        sqlx::query(AssertSqlSafe(app_clear_sql(t)))
                            .bind(&sub)
                            .bind(&socket)
                            .execute(pool)
                            .await?;
                    }
                }
            }
            sqlx::query(clear).bind(node).execute(pool).await?.rows_affected()
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
