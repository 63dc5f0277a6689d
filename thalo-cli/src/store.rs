//! The connection to the event store.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use thalo_postgres::{PgEventStore, SchemaName};

use crate::args::Global;
use crate::error::{CliError, Result};
use crate::sql::Sql;

/// An open event store and the tool's statements for its schema.
#[derive(Debug)]
pub(crate) struct Store {
    pub store: PgEventStore,
    pub pool: PgPool,
    pub schema: SchemaName,
    pub sql: Sql,
}

/// Whether the command needs the store's tables to exist already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// Every command but `migrate`.
    Migrated,
    /// `migrate` creates them.
    Nothing,
}

impl Store {
    /// Connects to `DATABASE_URL` and checks that the schema has an event store.
    ///
    /// # Errors
    ///
    /// A usage error without a database URL, [`CliError::Connect`] when Postgres cannot
    /// be reached, [`CliError::NotMigrated`] when the schema has no `events` table.
    pub(crate) async fn open(global: &Global, need: Need) -> Result<Self> {
        let schema = SchemaName::new(global.schema.as_str())?;
        let Some(url) = global.database_url.as_deref() else {
            return Err(CliError::usage(
                "no database given: pass --database-url or set DATABASE_URL",
            ));
        };
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_millis(global.pg_acquire_timeout_ms))
            .connect(url)
            .await
            .map_err(|source| CliError::Connect { source })?;
        // The tool never appends, so notifications are off (and the schema name is not
        // limited by the channel name's length).
        let store = PgEventStore::builder(pool.clone())
            .schema(schema.as_str())
            .notify(false)
            .build()?;
        let sql = Sql::new(&schema);
        if need == Need::Migrated {
            let exists: bool = sqlx::query_scalar(sql.table_exists)
                .bind(schema.qualify("events"))
                .fetch_one(&pool)
                .await
                .map_err(CliError::sql("looking for the event store"))?;
            if !exists {
                return Err(CliError::NotMigrated {
                    schema: schema.as_str().to_owned(),
                });
            }
        }
        Ok(Store {
            store,
            pool,
            schema,
            sql,
        })
    }

    /// The highest global position.
    pub(crate) async fn head(&self) -> Result<u64> {
        let head: i64 = sqlx::query_scalar(&self.sql.head)
            .fetch_one(&self.pool)
            .await
            .map_err(CliError::sql("reading the store's head"))?;
        Ok(u64::try_from(head).unwrap_or(0))
    }

    /// The aggregate types that have events.
    pub(crate) async fn aggregate_types(&self) -> Result<Vec<String>> {
        sqlx::query_scalar(&self.sql.aggregate_types)
            .fetch_all(&self.pool)
            .await
            .map_err(CliError::sql("listing aggregate types"))
    }
}
