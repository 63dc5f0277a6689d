//! The relay's view of the Postgres outbox: every SQL statement the relay runs.
//!
//! `thalo-postgres` inserts one `outbox` row per event in the transaction that appends
//! the event, and notifies the `<schema>_events` channel. The relay reads rows in
//! `outbox.id` order joined with their events, and deletes the rows whose messages
//! Kafka acknowledged. Statements are built once per schema from a validated
//! [`SchemaName`] (the one thing SQL cannot bind); every value is a bound parameter.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use thalo::{Error, EventEnvelope, Metadata, RawEvent};
use thalo_postgres::SchemaName;
use uuid::Uuid;

/// The relay's SQL for one schema.
#[derive(Debug, Clone)]
pub(crate) struct OutboxSql {
    /// `<schema>_events`, the channel `thalo-postgres` notifies after an append.
    pub(crate) channel: String,
    /// The text the advisory lock key is hashed from (bound, not interpolated).
    lock_name: String,
    select_batch: String,
    delete: String,
    lag: String,
}

/// Session-level advisory lock: held until released or until the session ends, so a
/// relay that dies (process killed, connection dropped) frees the outbox for a standby.
/// `hashtextextended` turns the per-schema lock name into the 64-bit key.
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))";
const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";

impl OutboxSql {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let outbox = schema.qualify("outbox");
        let events = schema.qualify("events");
        OutboxSql {
            channel: schema.channel(),
            lock_name: format!("thalo_kafka.relay.{schema}.outbox"),
            // The outbox is read in insertion order. Within one aggregate that is
            // sequence order: an append for sequence n+1 can only start after the
            // append of n has committed (it has to read version n first, and the unique
            // key on (aggregate_type, aggregate_id, sequence) rejects racing writers),
            // so its outbox id is allocated later and is greater.
            select_batch: format!(
                "SELECT o.id, e.position, e.event_id, e.aggregate_type, e.aggregate_id, \
                 e.sequence, e.event_type, e.event_version, e.payload::text AS payload, \
                 e.metadata, e.created_at \
                 FROM {outbox} o JOIN {events} e ON e.position = o.position \
                 ORDER BY o.id LIMIT $1"
            ),
            delete: format!("DELETE FROM {outbox} WHERE id = ANY($1)"),
            lag: format!(
                "SELECT count(*) AS pending, \
                 EXTRACT(EPOCH FROM (now() - min(e.created_at)))::float8 AS oldest_age \
                 FROM {outbox} o JOIN {events} e ON e.position = o.position"
            ),
        }
    }

    /// Tries to take the relay lock on this session.
    pub(crate) async fn try_lock(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(TRY_LOCK)
            .bind(&self.lock_name)
            .fetch_one(conn)
            .await
    }

    /// Releases the relay lock held by this session.
    pub(crate) async fn unlock(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(UNLOCK)
            .bind(&self.lock_name)
            .fetch_one(conn)
            .await
    }

    /// The oldest `limit` outbox rows with their events, in outbox order.
    pub(crate) async fn fetch_batch(
        &self,
        conn: &mut PgConnection,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(&self.select_batch)
            .bind(limit)
            .fetch_all(conn)
            .await
            .map_err(|e| Error::store("reading the outbox", e))?;
        rows.iter().map(OutboxRow::from_row).collect()
    }

    /// Deletes the rows with these ids (the ones Kafka acknowledged).
    pub(crate) async fn delete(&self, conn: &mut PgConnection, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        sqlx::query(&self.delete)
            .bind(ids)
            .execute(conn)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| Error::store("deleting delivered outbox rows", e))
    }

    /// How many rows wait and how old the oldest one is.
    pub(crate) async fn lag(&self, pool: &PgPool) -> Result<RelayLag, Error> {
        let row = sqlx::query(&self.lag)
            .fetch_one(pool)
            .await
            .map_err(|e| Error::store("measuring the outbox lag", e))?;
        let pending: i64 = row.try_get("pending").map_err(decode_err)?;
        let age: Option<f64> = row.try_get("oldest_age").map_err(decode_err)?;
        Ok(RelayLag {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_age: age.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }
}

/// How far the relay is behind the event store.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RelayLag {
    /// Outbox rows waiting to be published.
    pub pending: u64,
    /// Age of the oldest waiting event (time since it was stored), if any waits.
    pub oldest_age: Option<Duration>,
}

/// One outbox row and its event.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow {
    pub(crate) id: i64,
    pub(crate) envelope: EventEnvelope<RawEvent>,
}

impl OutboxRow {
    fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, Error> {
        let position: i64 = row.try_get("position").map_err(decode_err)?;
        let sequence: i64 = row.try_get("sequence").map_err(decode_err)?;
        let version: i16 = row.try_get("event_version").map_err(decode_err)?;
        let metadata: Option<Json<Metadata>> = row.try_get("metadata").map_err(decode_err)?;
        Ok(OutboxRow {
            id: row.try_get("id").map_err(decode_err)?,
            envelope: EventEnvelope {
                id: row.try_get::<Uuid, _>("event_id").map_err(decode_err)?,
                aggregate_type: row.try_get("aggregate_type").map_err(decode_err)?,
                aggregate_id: row.try_get("aggregate_id").map_err(decode_err)?,
                sequence: u64::try_from(sequence).map_err(decode_err)?,
                position: u64::try_from(position).map_err(decode_err)?,
                timestamp: row
                    .try_get::<DateTime<Utc>, _>("created_at")
                    .map_err(decode_err)?,
                metadata: metadata.map(|m| m.0).unwrap_or_default(),
                event: RawEvent {
                    event_type: row.try_get("event_type").map_err(decode_err)?,
                    version: u16::try_from(version).map_err(decode_err)?,
                    payload: row.try_get("payload").map_err(decode_err)?,
                },
            },
        })
    }
}

fn decode_err(e: impl Into<thalo::BoxError>) -> Error {
    Error::store("decoding an outbox row", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_schema_qualified() {
        let sql = OutboxSql::new(&SchemaName::new("tenant_a").unwrap());
        assert!(sql
            .select_batch
            .contains(r#"FROM "tenant_a".outbox o JOIN "tenant_a".events e"#));
        assert_eq!(
            sql.delete,
            r#"DELETE FROM "tenant_a".outbox WHERE id = ANY($1)"#
        );
        assert_eq!(sql.channel, "tenant_a_events");
        assert!(sql.lock_name.contains("tenant_a"));
    }
}
