//! Checkpoints: how far a named reader has processed the global log.

use sqlx::PgConnection;
use thalo::{CheckpointStore, Error};

use crate::error::{store, to_i64, to_u64};
use crate::sql::Sql;
use crate::PgEventStore;

pub(crate) async fn load(
    conn: &mut PgConnection,
    sql: &Sql,
    name: &str,
) -> Result<Option<u64>, Error> {
    let position: Option<i64> = sqlx::query_scalar(&sql.load_checkpoint)
        .bind(name)
        .fetch_optional(conn)
        .await
        .map_err(store("loading a checkpoint"))?;
    position.map(|p| to_u64(p, "checkpoint")).transpose()
}

pub(crate) async fn save(
    conn: &mut PgConnection,
    sql: &Sql,
    name: &str,
    position: u64,
) -> Result<(), Error> {
    sqlx::query(&sql.save_checkpoint)
        .bind(name)
        .bind(to_i64(position, "checkpoint")?)
        .execute(conn)
        .await
        .map_err(store("saving a checkpoint"))?;
    Ok(())
}

/// Checkpoints in the `checkpoints` table, one row per name, upserted.
impl CheckpointStore for PgEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, Error> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        load(&mut conn, &self.inner.sql, name).await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        save(&mut conn, &self.inner.sql, name, position).await
    }
}
