//! `thalo migrate`: the store's own migrations (`PgEventStore::migrate`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use crate::error::{CliError, Result};
use crate::output::{self, section, table, Report};
use crate::store::Store;

#[derive(Debug, Serialize)]
struct Migration {
    version: i64,
    description: String,
    installed_on: String,
    success: bool,
}

#[derive(Debug, Serialize)]
struct MigrateReport {
    schema: String,
    /// Migrations this run applied.
    applied: usize,
    /// Every migration of the schema.
    migrations: Vec<Migration>,
}

impl Report for MigrateReport {
    fn text(&self) -> String {
        let mut out = if self.applied == 0 {
            format!("schema `{}` is up to date\n", self.schema)
        } else {
            format!(
                "schema `{}`: applied {}\n",
                self.schema,
                output::count(self.applied as u64, "migration", "migrations")
            )
        };
        let mut rows = table(["VERSION", "DESCRIPTION", "INSTALLED ON"]);
        for m in &self.migrations {
            rows.add_row([
                m.version.to_string(),
                m.description.clone(),
                m.installed_on.clone(),
            ]);
        }
        section(&mut out, "Migrations", &rows);
        out
    }
}

pub(crate) async fn run(store: &Store, json: bool) -> Result<()> {
    let before = migrations(store).await?.len();
    store.store.migrate().await?;
    let migrations = migrations(store).await?;
    output::emit(
        &MigrateReport {
            schema: store.schema.as_str().to_owned(),
            applied: migrations.len().saturating_sub(before),
            migrations,
        },
        json,
    )
}

/// The applied migrations; none before the first run.
async fn migrations(store: &Store) -> Result<Vec<Migration>> {
    let exists: bool = sqlx::query_scalar(store.sql.table_exists)
        .bind(store.schema.qualify("_sqlx_migrations"))
        .fetch_one(&store.pool)
        .await
        .map_err(CliError::sql("looking for the migrations table"))?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(&store.sql.migrations)
        .fetch_all(&store.pool)
        .await
        .map_err(CliError::sql("listing migrations"))?;
    rows.iter()
        .map(|row| {
            let installed_on: DateTime<Utc> = row.try_get(2)?;
            Ok(Migration {
                version: row.try_get(0)?,
                description: row.try_get(1)?,
                installed_on: output::time(&installed_on),
                success: row.try_get(3)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(CliError::sql("decoding migrations"))
}
