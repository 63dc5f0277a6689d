//! Appending: events, outbox rows and the notification in one statement.

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Connection, PgConnection, Postgres, Row};
use thalo::{Aggregate, AggregateType, Error, Event, EventEnvelope, Metadata};
use tracing::warn;
use uuid::Uuid;

use crate::error::{self, store, to_i64, to_u64};
use crate::store::Inner;
use crate::NotifyMode;

/// One append's events, encoded for the `UNNEST` insert (alone, or with other appends in
/// a group-commit batch).
pub(crate) struct AppendBatch {
    pub(crate) aggregate_type: &'static str,
    pub(crate) aggregate_id: String,
    pub(crate) expected_version: u64,
    pub(crate) expected: i64,
    pub(crate) ids: Vec<Uuid>,
    pub(crate) types: Vec<&'static str>,
    pub(crate) versions: Vec<i16>,
    pub(crate) payloads: Vec<String>,
    pub(crate) metadata: String,
    pub(crate) metadata_value: Metadata,
    pub(crate) timestamp: DateTime<Utc>,
}

impl AppendBatch {
    /// Encodes everything before touching the database: an event that cannot be
    /// serialized stores nothing.
    pub(crate) fn new<A: Aggregate>(
        id: &A::Id,
        expected_version: u64,
        events: &[A::Event],
        metadata: &Metadata,
    ) -> Result<Self, Error> {
        let mut batch = AppendBatch {
            aggregate_type: <A as AggregateType>::TYPE,
            aggregate_id: id.to_string(),
            expected_version,
            expected: to_i64(expected_version, "expected version")?,
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            versions: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            metadata: serde_json::to_string(metadata)
                .map_err(|e| Error::serialization("event metadata", e))?,
            metadata_value: metadata.clone(),
            // Postgres keeps microseconds: truncate so that what `append` returns equals
            // what is read back.
            timestamp: Utc::now().trunc_subsecs(6),
        };
        for event in events {
            let event_type = event.event_type();
            let version = i16::try_from(event.event_version()).map_err(|_| {
                Error::serialization(
                    event_type,
                    format!(
                        "schema version {} does not fit the store's SMALLINT column",
                        event.event_version()
                    ),
                )
            })?;
            batch.ids.push(Uuid::now_v7());
            batch.types.push(event_type);
            batch.versions.push(version);
            batch.payloads.push(event.encode()?);
        }
        Ok(batch)
    }

    /// Refuses the append when one of its events, with the metadata every event
    /// carries, is larger than `limit` bytes: such an event could be stored but never
    /// published (Kafka refuses messages above its size limit), and it would hold back
    /// every later event of its aggregate in the outbox.
    pub(crate) fn check_size(&self, limit: usize) -> Result<(), Error> {
        for (payload, event_type) in self.payloads.iter().zip(&self.types) {
            let size = payload.len() + self.metadata.len();
            if size > limit {
                return Err(Error::EventTooLarge {
                    aggregate_type: self.aggregate_type.into(),
                    aggregate_id: self.aggregate_id.clone(),
                    event_type: (*event_type).to_owned(),
                    size,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// `sql` (an append statement) with this batch bound as `$1`..`$9`; the statement's
    /// own further parameters are bound by the caller.
    pub(crate) fn query<'q>(&'q self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql)
            .bind(self.aggregate_type)
            .bind(&self.aggregate_id)
            .bind(self.expected)
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.versions)
            .bind(&self.payloads)
            .bind(&self.metadata)
            .bind(self.timestamp)
    }

    /// Decodes the append statement's result row into the new positions, or a conflict
    /// when the stream was not at the expected version.
    pub(crate) fn positions(&self, row: &PgRow) -> Result<Vec<i64>, Error> {
        let version: i64 = row
            .try_get(0)
            .map_err(store("decoding the append result"))?;
        let positions: Option<Vec<i64>> = row
            .try_get(1)
            .map_err(store("decoding the append result"))?;
        self.check(version, positions)
    }

    /// The positions of the inserted events when the stream was at the expected version
    /// (`version` is the head the statement saw), a conflict otherwise.
    ///
    /// Every append that stored its events passes here (alone, keyed, in the caller's
    /// transaction, or in a group-commit batch), so this is where appends are counted:
    /// `thalo_appends_total` and `thalo_append_events_total`.
    pub(crate) fn check(
        &self,
        version: i64,
        positions: Option<Vec<i64>>,
    ) -> Result<Vec<i64>, Error> {
        match positions {
            Some(positions) if version == self.expected && positions.len() == self.ids.len() => {
                let aggregate_type = self.aggregate_type;
                metrics::counter!("thalo_appends_total", "aggregate_type" => aggregate_type)
                    .increment(1);
                metrics::counter!("thalo_append_events_total", "aggregate_type" => aggregate_type)
                    .increment(positions.len() as u64);
                Ok(positions)
            }
            _ => Err(Error::Conflict {
                aggregate_type: self.aggregate_type.into(),
                aggregate_id: self.aggregate_id.clone(),
                expected: self.expected_version,
                actual: Some(to_u64(version, "version")?),
                source: None,
            }),
        }
    }

    /// The envelopes of the stored events, given their positions by sequence.
    pub(crate) fn envelopes<A: Aggregate>(
        &self,
        events: Vec<A::Event>,
        positions: Vec<i64>,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        events
            .into_iter()
            .zip(positions)
            .zip(&self.ids)
            .zip(1..)
            .map(|(((event, position), id), offset)| {
                Ok(EventEnvelope {
                    id: *id,
                    aggregate_type: self.aggregate_type.to_owned(),
                    aggregate_id: self.aggregate_id.clone(),
                    sequence: self.expected_version + offset,
                    position: to_u64(position, "position")?,
                    timestamp: self.timestamp,
                    metadata: self.metadata_value.clone(),
                    event,
                })
            })
            .collect()
    }

    /// Turns the append statement's result row into envelopes, or a conflict when the
    /// stream was not at the expected version.
    fn finish<A: Aggregate>(
        &self,
        events: Vec<A::Event>,
        row: &PgRow,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        let positions = self.positions(row)?;
        self.envelopes::<A>(events, positions)
    }
}

impl Inner {
    /// Runs the append statement, notifying in it when `notify`.
    async fn run_append<'c, X>(
        &self,
        executor: X,
        batch: &AppendBatch,
        notify: bool,
    ) -> Result<PgRow, Error>
    where
        X: sqlx::Executor<'c, Database = Postgres>,
    {
        let sql = if notify {
            &self.sql.append_notify
        } else {
            &self.sql.append
        };
        let mut query = batch.query(sql);
        if notify {
            query = query.bind(&self.channel);
        }
        query.fetch_one(executor).await.map_err(|err| {
            error::append(
                err,
                batch.aggregate_type,
                &batch.aggregate_id,
                batch.expected_version,
            )
        })
    }

    /// Appends `events` on `executor` (the pool, or a connection outside a transaction).
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
    pub(crate) async fn append<'c, A, X>(
        &self,
        executor: X,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error>
    where
        A: Aggregate,
        X: sqlx::Executor<'c, Database = Postgres>,
    {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let batch = AppendBatch::new::<A>(id, expected_version, &events, metadata)?;
        batch.check_size(self.max_event_bytes)?;
        let positions = self.append_encoded(executor, &batch).await?;
        batch.envelopes::<A>(events, positions)
    }

    /// Appends one encoded batch on its own, notifying per the store's [`NotifyMode`];
    /// returns the new positions by sequence. Also the fallback of group commit.
    pub(crate) async fn append_encoded<'c, X>(
        &self,
        executor: X,
        batch: &AppendBatch,
    ) -> Result<Vec<i64>, Error>
    where
        X: sqlx::Executor<'c, Database = Postgres>,
    {
        // A single statement runs in its own implicit transaction: no BEGIN/COMMIT round
        // trips are needed for the events, the outbox rows and the notification to
        // commit together.
        let row = self
            .run_append(executor, batch, self.notify == NotifyMode::InTransaction)
            .await?;
        self.appended(batch, &row)
    }

    /// The positions of a committed append, announced when notifying after commit.
    pub(crate) fn appended(&self, batch: &AppendBatch, row: &PgRow) -> Result<Vec<i64>, Error> {
        let positions = batch.positions(row)?;
        if self.notify == NotifyMode::AfterCommit {
            if let Some(last) = positions.last() {
                self.announce(*last);
            }
        }
        Ok(positions)
    }

    /// Has the store's background announcer `NOTIFY` the events channel with `last`
    /// (a committed position). Never waits and never fails: a notification is a wake-up,
    /// and a lost one only delays listeners until they poll.
    pub(crate) fn announce(&self, last: i64) {
        self.announcer.announce(&self.pool, &self.channel, last);
    }

    /// [`Inner::append`] in the caller's transaction, inside a savepoint.
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
    pub(crate) async fn append_in<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let batch = AppendBatch::new::<A>(id, expected_version, &events, metadata)?;
        batch.check_size(self.max_event_bytes)?;
        let mut savepoint = conn
            .begin()
            .await
            .map_err(store("opening a savepoint for the append"))?;
        // Only the caller knows when its transaction commits: notify inside it.
        let notify = self.notify.is_on();
        let result = self.run_append(&mut *savepoint, &batch, notify).await;
        let outcome = result.and_then(|row| batch.finish::<A>(events, &row));
        match outcome {
            Ok(stored) => {
                savepoint
                    .commit()
                    .await
                    .map_err(store("releasing the append's savepoint"))?;
                Ok(stored)
            }
            Err(err) => {
                if let Err(rollback) = savepoint.rollback().await {
                    warn!(error = %rollback, "rolling back the append's savepoint failed");
                }
                Err(err)
            }
        }
    }
}
