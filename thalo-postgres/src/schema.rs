//! The Postgres schema the store lives in: name validation and migrations.

use std::fmt;

use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};
use thalo::Error;
use tracing::{debug, info};

use crate::sql;

/// A validated Postgres schema name.
///
/// Schema names are the one part of the store's SQL that cannot be a bound parameter, so
/// they are restricted to `^[a-z_][a-z0-9_]{0,62}$` (lowercase, so quoting never changes
/// their meaning) and must not start with `pg_` (reserved by Postgres). Every SQL string
/// is built once from a `SchemaName`, always quoted.
///
/// ```
/// use thalo_postgres::SchemaName;
///
/// let schema = SchemaName::new("billing").unwrap();
/// assert_eq!(schema.as_str(), "billing");
/// assert_eq!(schema.quoted(), "\"billing\"");
/// assert_eq!(schema.qualify("events"), "\"billing\".events");
/// assert!(SchemaName::new("Billing").is_err());
/// assert!(SchemaName::new("x; DROP TABLE events").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

/// Why a schema name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaNameError {
    /// The name is empty or longer than 63 bytes (Postgres' identifier limit).
    #[error("schema name `{name}` must be 1 to 63 characters long")]
    Length {
        /// The rejected name.
        name: String,
    },
    /// The name has a character outside `[a-z0-9_]` or starts with a digit.
    #[error("schema name `{name}` must match `^[a-z_][a-z0-9_]*$`")]
    Characters {
        /// The rejected name.
        name: String,
    },
    /// The name starts with `pg_`, which Postgres reserves for system schemas.
    #[error("schema name `{name}` must not start with `pg_` (reserved by Postgres)")]
    Reserved {
        /// The rejected name.
        name: String,
    },
}

impl From<SchemaNameError> for Error {
    fn from(err: SchemaNameError) -> Self {
        Error::config(err.to_string())
    }
}

impl SchemaName {
    /// The default schema, `thalo`.
    pub const DEFAULT: &'static str = "thalo";

    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// Returns a [`SchemaNameError`] when `name` does not match `^[a-z_][a-z0-9_]{0,62}$`
    /// or starts with `pg_`.
    pub fn new(name: impl Into<String>) -> Result<Self, SchemaNameError> {
        let name = name.into();
        if name.is_empty() || name.len() > 63 {
            return Err(SchemaNameError::Length { name });
        }
        let mut bytes = name.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
        let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !first_ok || !rest_ok {
            return Err(SchemaNameError::Characters { name });
        }
        if name.starts_with("pg_") {
            return Err(SchemaNameError::Reserved { name });
        }
        Ok(SchemaName(name))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted identifier, e.g. `"thalo"`.
    pub fn quoted(&self) -> String {
        // The validated name contains no `"`, so wrapping it is a complete quoting.
        format!("\"{}\"", self.0)
    }

    /// A schema-qualified table name, e.g. `"thalo".events`. `table` must be a plain
    /// lowercase identifier (it is not quoted).
    pub fn qualify(&self, table: &str) -> String {
        format!("\"{}\".{table}", self.0)
    }

    /// The `LISTEN`/`NOTIFY` channel appends notify on: `<schema>_events`.
    pub fn channel(&self) -> String {
        format!("{}_events", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        SchemaName(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SchemaName {
    type Err = SchemaNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchemaName::new(s)
    }
}

/// Creates the schema if needed and applies the embedded migrations to it.
///
/// Runs on a dedicated connection (not one of the pool's, so the pool never sees the
/// changed `search_path`) under a session advisory lock keyed by the schema name, so two
/// processes migrating at once take turns and the second finds nothing to do. The
/// migrations use unqualified table names and run with `search_path` set to the schema,
/// so both the tables and sqlx's `_sqlx_migrations` bookkeeping table live in it.
pub(crate) async fn migrate(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    let options = pool.connect_options();
    let mut conn = options
        .connect()
        .await
        .map_err(|e| Error::store("connecting to migrate", e))?;
    let result = migrate_locked(&mut conn, schema).await;
    // Closing the session also drops the advisory lock if unlocking failed.
    if let Err(err) = conn.close().await {
        debug!(error = %err, "closing the migration connection failed");
    }
    result
}

async fn migrate_locked(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), Error> {
    let key = sql::migrate_lock_key(schema);
    sqlx::query(sql::ADVISORY_LOCK)
        .bind(&key)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::store("taking the migration lock", e))?;
    let result = run_migrations(conn, schema).await;
    let unlocked = sqlx::query(sql::ADVISORY_UNLOCK)
        .bind(&key)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::store("releasing the migration lock", e));
    result.and(unlocked.map(drop))
}

async fn run_migrations(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), Error> {
    conn.execute(sql::create_schema(schema).as_str())
        .await
        .map_err(|e| Error::store(format!("creating schema {schema}"), e))?;
    conn.execute(sql::set_search_path(schema).as_str())
        .await
        .map_err(|e| Error::store("setting search_path", e))?;
    let mut migrator = sqlx::migrate!("./migrations");
    // Our advisory lock is per schema; sqlx's own lock is per database and would make
    // migrations of unrelated schemas wait for each other.
    migrator.set_locking(false);
    migrator
        .run_direct(&mut *conn)
        .await
        .map_err(|e| Error::store(format!("migrating schema {schema}"), e))?;
    // Stored transaction ids ahead of this cluster's (a restore from another cluster)
    // would hide new events from every reader without an error anywhere: refuse to
    // start on them instead.
    crate::rebase::check(conn, schema).await?;
    info!(schema = %schema, "event store schema is up to date");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_lowercase_identifiers() {
        for name in [
            "thalo",
            "_x",
            "a1_b2",
            "t_0123456789abcdef",
            &"a".repeat(63),
        ] {
            assert_eq!(SchemaName::new(name).map(|s| s.0), Ok(name.to_owned()));
        }
    }

    #[test]
    fn rejects_everything_else() {
        for name in [
            "",
            "1abc",
            "Thalo",
            "thalo-events",
            "thalo events",
            "thalo\"; DROP SCHEMA public; --",
            "thälo",
            &"a".repeat(64),
        ] {
            assert!(
                SchemaName::new(name).is_err(),
                "{name:?} should be rejected"
            );
        }
        assert_eq!(
            SchemaName::new("pg_temp"),
            Err(SchemaNameError::Reserved {
                name: "pg_temp".into()
            })
        );
    }

    #[test]
    fn quotes_and_qualifies() {
        let schema = SchemaName::new("billing").unwrap();
        assert_eq!(schema.qualify("outbox"), "\"billing\".outbox");
        assert_eq!(schema.channel(), "billing_events");
        assert_eq!(SchemaName::default().as_str(), "thalo");
    }
}
