//! Idempotent commands: the command key is recorded in the append's statement.

use sqlx::{PgConnection, Row};
use thalo::{Aggregate, AggregateType, CommandKey, Error, Metadata, Once, Recorded, Rejection};

use crate::append::AppendBatch;
use crate::error::{self, store, to_i64, to_u64};
use crate::row;
use crate::store::Inner;
use crate::NotifyMode;

impl Inner {
    /// The retention of command keys, as the seconds the SQL statements bind.
    fn retention_secs(&self) -> f64 {
        self.command_retention.as_secs_f64()
    }

    /// What the command under `key` did, if it is recorded and unexpired; an error when
    /// it was recorded for another command or aggregate.
    pub(crate) async fn find_command<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &A::Id,
        key: &CommandKey,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        let Some(row) = sqlx::query(&self.sql.find_command)
            .bind(key.id.as_str())
            .bind(self.retention_secs())
            .fetch_optional(&mut *conn)
            .await
            .map_err(store("looking up a command id"))?
        else {
            return Ok(None);
        };
        let decode = |e| Error::store("decoding a command record", e);
        let aggregate_type: String = row.try_get(0).map_err(decode)?;
        let aggregate_id: String = row.try_get(1).map_err(decode)?;
        let fingerprint: i64 = row.try_get(2).map_err(decode)?;
        let first: i64 = row.try_get(3).map_err(decode)?;
        let last: i64 = row.try_get(4).map_err(decode)?;
        let rejected: bool = row.try_get(5).map_err(decode)?;
        let code: Option<String> = row.try_get(6).map_err(decode)?;
        let message: Option<String> = row.try_get(7).map_err(decode)?;
        let this_id = id.to_string();
        if aggregate_type != <A as AggregateType>::TYPE
            || aggregate_id != this_id
            || fingerprint != key.fingerprint
        {
            return Err(Error::CommandIdReused {
                command_id: key.id.to_string(),
                aggregate_type,
                aggregate_id,
            });
        }
        if rejected {
            return Ok(Some(Recorded::Rejected(Rejection { code, message })));
        }
        if last < first {
            return Ok(Some(Recorded::Stored(Vec::new())));
        }
        let rows = sqlx::query(&self.sql.read_range)
            .bind(A::TYPE)
            .bind(this_id)
            .bind(first)
            .bind(last)
            .fetch_all(&mut *conn)
            .await
            .map_err(store("reading a command's events"))?;
        rows.iter()
            .map(row::decoded)
            .collect::<Result<_, _>>()
            .map(|events| Some(Recorded::Stored(events)))
    }

    /// Records a command that stored nothing, unless its key is recorded; returns the
    /// earlier record, which then stands.
    pub(crate) async fn record_command<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &A::Id,
        version: u64,
        key: &CommandKey,
        rejection: Option<&Rejection>,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        for _ in 0..3 {
            let recorded = sqlx::query(&self.sql.record_command)
                .bind(key.id.as_str())
                .bind(A::TYPE)
                .bind(id.to_string())
                .bind(key.fingerprint)
                .bind(to_i64(version, "version")?)
                .bind(rejection.is_some())
                .bind(rejection.and_then(|r| r.code.as_deref()))
                .bind(rejection.and_then(|r| r.message.as_deref()))
                .bind(self.retention_secs())
                .fetch_optional(&mut *conn)
                .await
                .map_err(store("recording a command id"))?;
            if recorded.is_some() {
                return Ok(None);
            }
            // Recorded before (the insert waited for a concurrent one to commit): that
            // record stands. Should it have expired in between, record again.
            if let Some(recorded) = self.find_command::<A>(conn, id, key).await? {
                return Ok(Some(recorded));
            }
        }
        Err(Error::store(
            "recording a command id",
            format!("the record of `{}` kept expiring while it was read", key.id),
        ))
    }

    /// Appends `events` and records `key` in one statement, or, when the key is
    /// recorded already, returns the events it stored.
    #[tracing::instrument(
        level = "debug",
        name = "append",
        skip_all,
        fields(
            aggregate_type = A::TYPE,
            aggregate_id = %id,
            expected_version = expected_version,
            events = events.len(),
        )
    )]
    pub(crate) async fn append_once<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> Result<Once<A::Event>, Error> {
        if events.is_empty() {
            return Ok(Once::Stored(Vec::new()));
        }
        let batch = AppendBatch::new::<A>(id, expected_version, &events, metadata)?;
        batch.check_size(self.max_event_bytes)?;
        let notify = self.notify == NotifyMode::InTransaction;
        let sql = if notify {
            &self.sql.append_once_notify
        } else {
            &self.sql.append_once
        };
        let mut query = batch
            .query(sql)
            .bind(key.id.as_str())
            .bind(key.fingerprint)
            .bind(self.retention_secs());
        if notify {
            query = query.bind(&self.channel);
        }
        let not_stored = match query.fetch_one(&mut *conn).await {
            Ok(row) => {
                let recorded: bool = row
                    .try_get("recorded")
                    .map_err(store("decoding the append result"))?;
                if recorded {
                    let positions = self.appended(&batch, &row)?;
                    return batch.envelopes::<A>(events, positions).map(Once::Stored);
                }
                // The key is recorded already (a conflict on the key, read next), or
                // the stream moved on (a conflict on the version).
                let version: i64 = row
                    .try_get(0)
                    .map_err(store("decoding the append result"))?;
                Error::Conflict {
                    aggregate_type: batch.aggregate_type.into(),
                    aggregate_id: batch.aggregate_id.clone(),
                    expected: expected_version,
                    actual: Some(to_u64(version, "version")?),
                    source: None,
                }
            }
            Err(err) => error::append(
                err,
                batch.aggregate_type,
                &batch.aggregate_id,
                batch.expected_version,
            ),
        };
        if !not_stored.is_conflict() {
            return Err(not_stored);
        }
        // A conflict may be the same key winning a race: its outcome is the answer.
        match self.find_command::<A>(conn, id, key).await? {
            Some(recorded) => recorded.into_replay(),
            None => Err(not_stored),
        }
    }

    /// Deletes expired command records; returns how many.
    pub(crate) async fn prune_commands(&self) -> Result<u64, Error> {
        let done = sqlx::query(&self.sql.prune_commands)
            .bind(self.retention_secs())
            .execute(&self.pool)
            .await
            .map_err(store("pruning command ids"))?;
        Ok(done.rows_affected())
    }
}
