//! Sequenced dead letters: a consumer that gives up on an aggregate's event parks the
//! aggregate's stream, and its later events wait behind it instead of being applied
//! past it.
//!
//! A consumer parks a stream when it gives
//! up on event `n` (its handler keeps failing, or the event cannot be decoded) or when
//! it finds a gap (it expected `n` and got `n + k`). The `consumer` argument of the
//! functions below names it: a Postgres projection's checkpoint key
//! ([`checkpoint_key`](crate::checkpoint_key)`(name, version)`), or a
//! plain handler's consumer group id. From then on, that consumer holds
//! every later event of the stream: it counts them (`held`) and moves on, so other
//! streams keep flowing. Nothing is lost, because every held event is in the store:
//!
//! - [`PgEventStore::redrive_projection`] applies the stream's events from `n` on, read
//!   from the store, in order, in one transaction with the projection's checkpoint, and
//!   releases the stream: exactly once, whatever was held meanwhile.
//! - [`PgEventStore::redrive_handler`] does the same for a plain event handler (at
//!   least once, as handlers always are).
//! - [`PgEventStore::skip_parked`] skips event `n` on an operator's explicit decision.
//!
//! Every park, re-drive and skip is recorded in `parking_log`. For projections the
//! parked flag lives on the stream's checkpoint row, which every applier locks: a
//! re-drive and a consumer applying the same stream take turns, so no event is applied
//! twice or skipped.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use thalo::{Error, Event, EventEnvelope, EventHandler, RawEvent};
use tracing::{info, warn};

use crate::error::{store, to_i64, to_u64};
use crate::{row, PgEventStore, PgProjection};

/// A stream a consumer parked.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedStream {
    /// The consumer: a projection's checkpoint key, or a handler's consumer group id.
    pub consumer: String,
    /// Type name of the aggregate.
    pub aggregate_type: String,
    /// Identity of the aggregate.
    pub aggregate_id: String,
    /// The first event the consumer did not apply.
    pub sequence: u64,
    /// Why.
    pub error: String,
    /// How many later events were held behind it.
    pub held: u64,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
    /// When it last changed (more held events, a failed re-drive).
    pub updated_at: DateTime<Utc>,
}

/// What a re-drive did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Redriven {
    /// Events handed to the handler or projection.
    pub applied: u64,
    /// The stream's last sequence after the re-drive.
    pub sequence: u64,
}

/// The parking statements of one schema.
#[derive(Debug)]
pub(crate) struct ParkingSql {
    park: String,
    hold: String,
    list: String,
    list_one: String,
    lock_checkpoint: String,
    release_checkpoint: String,
    skip_checkpoint: String,
    lock_parked: String,
    unpark: String,
    update_parked: String,
    log: String,
    read_stream_from: String,
    request_redrive: String,
    redrive_requests: String,
    clear_redrive_request: String,
}

impl ParkingSql {
    pub(crate) fn new(schema: &crate::SchemaName) -> Self {
        let parked = schema.qualify("consumer_parked");
        let checkpoints = schema.qualify("stream_checkpoints");
        let log = schema.qualify("parking_log");
        let events = schema.qualify("events");
        let columns =
            "consumer, aggregate_type, aggregate_id, sequence, error, held, parked_at, updated_at";
        ParkingSql {
            // A second park of a parked stream keeps the first sequence and error: the
            // stream is stuck at the first event it did not apply.
            park: format!(
                "WITH checkpoint AS ( \
                     INSERT INTO {checkpoints} AS c (projection, aggregate_type, aggregate_id, sequence, parked) \
                     VALUES ($1::text, $2::text, $3::text, $4::int8 - 1, true) \
                     ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET parked = true), \
                 parked AS ( \
                     INSERT INTO {parked} AS p (consumer, aggregate_type, aggregate_id, sequence, error, held) \
                     VALUES ($1::text, $2::text, $3::text, $4::int8, $5::text, $6::int8) \
                     ON CONFLICT (consumer, aggregate_type, aggregate_id) \
                     DO UPDATE SET held = p.held + EXCLUDED.held, updated_at = now() \
                     RETURNING (xmax = 0) AS new) \
                 INSERT INTO {log} (consumer, aggregate_type, aggregate_id, action, sequence, detail) \
                 SELECT $1::text, $2::text, $3::text, 'parked', $4::int8, $5::text FROM parked WHERE new"
            ),
            hold: format!(
                "UPDATE {parked} AS p SET held = p.held + k.held, updated_at = now() \
                 FROM UNNEST($2::text[], $3::text[], $4::int8[]) AS k(aggregate_type, aggregate_id, held) \
                 WHERE p.consumer = $1 AND p.aggregate_type = k.aggregate_type \
                   AND p.aggregate_id = k.aggregate_id"
            ),
            list: format!(
                "SELECT {columns} FROM {parked} WHERE ($1::text IS NULL OR consumer = $1) \
                 ORDER BY parked_at, consumer, aggregate_type, aggregate_id"
            ),
            list_one: format!(
                "SELECT {columns} FROM {parked} \
                 WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3"
            ),
            lock_checkpoint: format!(
                "SELECT sequence, parked FROM {checkpoints} \
                 WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3 FOR UPDATE"
            ),
            release_checkpoint: format!(
                "UPDATE {checkpoints} SET sequence = $4, parked = false \
                 WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3"
            ),
            skip_checkpoint: format!(
                "UPDATE {checkpoints} SET sequence = $4 \
                 WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3"
            ),
            lock_parked: format!(
                "SELECT {columns} FROM {parked} \
                 WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 FOR UPDATE"
            ),
            unpark: format!(
                "DELETE FROM {parked} WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3"
            ),
            update_parked: format!(
                "UPDATE {parked} SET sequence = $4, error = $5, updated_at = now() \
                 WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3"
            ),
            log: format!(
                "INSERT INTO {log} (consumer, aggregate_type, aggregate_id, action, sequence, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            request_redrive: format!(
                "WITH requested AS ( \
                     UPDATE {parked} SET redrive_requested_at = now() \
                     WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
                     RETURNING sequence) \
                 INSERT INTO {log} (consumer, aggregate_type, aggregate_id, action, sequence, detail) \
                 SELECT $1, $2, $3, 'redrive_requested', sequence, $4 FROM requested \
                 RETURNING sequence"
            ),
            redrive_requests: format!(
                "SELECT aggregate_type, aggregate_id FROM {parked} \
                 WHERE consumer = $1 AND redrive_requested_at IS NOT NULL \
                 ORDER BY redrive_requested_at"
            ),
            clear_redrive_request: format!(
                "UPDATE {parked} SET redrive_requested_at = NULL \
                 WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3"
            ),
            read_stream_from: format!(
                "SELECT position, event_id, aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload::text, metadata::text, created_at \
                 FROM {events} WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence >= $3 \
                 ORDER BY sequence"
            ),
        }
    }
}

fn parked_stream(row: &PgRow) -> Result<ParkedStream, Error> {
    let get = |e: sqlx::Error| Error::store("decoding a parked stream", e);
    Ok(ParkedStream {
        consumer: row.try_get(0).map_err(get)?,
        aggregate_type: row.try_get(1).map_err(get)?,
        aggregate_id: row.try_get(2).map_err(get)?,
        sequence: to_u64(row.try_get(3).map_err(get)?, "sequence")?,
        error: row.try_get(4).map_err(get)?,
        held: to_u64(row.try_get(5).map_err(get)?, "count")?,
        parked_at: row.try_get(6).map_err(get)?,
        updated_at: row.try_get(7).map_err(get)?,
    })
}

impl PgEventStore {
    /// Parks a stream for `consumer`: `sequence` is the first event it did not apply,
    /// `held` how many later events it holds already. Recorded in `parking_log`;
    /// parking a parked stream only adds to its held count.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the statement fails.
    pub async fn park_stream(
        &self,
        consumer: &str,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: u64,
        error: &str,
    ) -> Result<(), Error> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        park_in(
            &mut conn,
            &self.inner.parking,
            consumer,
            (aggregate_type, aggregate_id),
            sequence,
            error,
            0,
        )
        .await
    }

    /// The streams parked by `consumer` (or by every consumer), oldest first.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn parked_streams(&self, consumer: Option<&str>) -> Result<Vec<ParkedStream>, Error> {
        let rows = sqlx::query(&self.inner.parking.list)
            .bind(consumer)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store("listing parked streams"))?;
        rows.iter().map(parked_stream).collect()
    }

    /// The parked stream of `consumer`, if that stream is parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn parked_stream(
        &self,
        consumer: &str,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<ParkedStream>, Error> {
        let row = sqlx::query(&self.inner.parking.list_one)
            .bind(consumer)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store("reading a parked stream"))?;
        row.as_ref().map(parked_stream).transpose()
    }

    /// Re-drives a stream `projection` parked: applies the stream's events after its
    /// checkpoint, read from the store, in order, and releases the stream, all in one
    /// transaction with the checkpoint (see [`ParkedStream`]). Run it once the
    /// cause is fixed (e.g. a new version of the projection is deployed); events the
    /// consumer held meanwhile are among those applied, and later ones flow normally.
    /// `None` when the stream is not parked.
    ///
    /// # Errors
    ///
    /// Returns the projection's error ([`Error::Handler`]) or a decoding error when an
    /// event still fails: nothing is applied, the stream stays parked and its recorded
    /// error is updated. [`Error::Store`] when the database fails.
    pub async fn redrive_projection<E, P>(
        &self,
        projection: &P,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Redriven>, Error>
    where
        E: Event,
        P: PgProjection<E>,
    {
        let key = crate::checkpoint_key(projection.name(), projection.version());
        let name = key.as_ref();
        let sql = &self.inner.parking;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(store("beginning a re-drive"))?;
        let row = stream_query(&sql.lock_checkpoint, name, aggregate_type, aggregate_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store("locking a stream checkpoint"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let checkpoint: i64 = row.try_get(0).map_err(store("decoding a checkpoint"))?;
        let parked: bool = row.try_get(1).map_err(store("decoding a checkpoint"))?;
        if !parked {
            return Ok(None);
        }
        let from = to_u64(checkpoint, "sequence")? + 1;
        let result = async {
            let events = self
                .read_stream_from(&mut tx, aggregate_type, aggregate_id, from)
                .await?;
            let envelopes = events
                .iter()
                .map(EventEnvelope::decode)
                .collect::<Result<Vec<EventEnvelope<E>>, Error>>()?;
            if let Some(gap) = first_gap(&envelopes, from) {
                return Err(Error::handler(
                    name,
                    format!("the store has no event {gap} of this stream"),
                ));
            }
            let refs: Vec<&EventEnvelope<E>> = envelopes.iter().collect();
            if !refs.is_empty() {
                projection
                    .handle_batch(&mut tx, &refs)
                    .await
                    .map_err(|err| match err {
                        err @ Error::Handler { .. } => err,
                        err => Error::handler(name, err),
                    })?;
            }
            Ok(envelopes.last().map_or(from - 1, |e| e.sequence))
        }
        .await;
        match result {
            Ok(last) => {
                let redriven = Redriven {
                    applied: last + 1 - from,
                    sequence: last,
                };
                stream_query(&sql.release_checkpoint, name, aggregate_type, aggregate_id)
                    .bind(to_i64(last, "sequence")?)
                    .execute(&mut *tx)
                    .await
                    .map_err(store("releasing a parked stream"))?;
                self.finish_redrive(&mut tx, name, (aggregate_type, aggregate_id), &redriven)
                    .await?;
                tx.commit().await.map_err(store("committing a re-drive"))?;
                info!(
                    projection = name,
                    aggregate_type,
                    aggregate_id,
                    applied = redriven.applied,
                    "parked stream re-driven"
                );
                Ok(Some(redriven))
            }
            Err(err) => {
                let _ = tx.rollback().await;
                self.record_failed_redrive(name, (aggregate_type, aggregate_id), from, &err)
                    .await;
                Err(err)
            }
        }
    }

    /// Re-drives a stream the event handler `consumer` parked: hands the stream's
    /// events from the first one it did not apply to `handler`, in order, and releases
    /// the stream. Delivery to a handler is at least once, as always: an event the
    /// handler saw before it was parked may come again.
    ///
    /// # Errors
    ///
    /// Returns the handler's error ([`Error::Handler`]) or a decoding error: the stream
    /// stays parked at the failing event (the events before it are not redone next
    /// time). [`Error::Store`] when the database fails.
    pub async fn redrive_handler<E, H>(
        &self,
        consumer: &str,
        handler: &H,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Redriven>, Error>
    where
        E: Event,
        H: EventHandler<E>,
    {
        let sql = &self.inner.parking;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(store("beginning a re-drive"))?;
        let row = stream_query(&sql.lock_parked, consumer, aggregate_type, aggregate_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store("locking a parked stream"))?;
        let Some(parked) = row.as_ref().map(parked_stream).transpose()? else {
            return Ok(None);
        };
        let events = self
            .read_stream_from(&mut tx, aggregate_type, aggregate_id, parked.sequence)
            .await?;
        let mut last = parked.sequence - 1;
        for raw in &events {
            let outcome = match raw.decode::<E>() {
                Ok(envelope) => handler.handle(&envelope).await.map_err(|err| match err {
                    err @ Error::Handler { .. } => err,
                    err => Error::handler(consumer, err),
                }),
                Err(err) => Err(err),
            };
            if let Err(err) = outcome {
                // Keep the progress: the stream stays parked at the failing event, and
                // its checkpoint row says so too.
                stream_query(&sql.skip_checkpoint, consumer, aggregate_type, aggregate_id)
                    .bind(to_i64(raw.sequence, "sequence")? - 1)
                    .execute(&mut *tx)
                    .await
                    .map_err(store("updating a parked stream"))?;
                stream_query(&sql.update_parked, consumer, aggregate_type, aggregate_id)
                    .bind(to_i64(raw.sequence, "sequence")?)
                    .bind(error_text(&err))
                    .execute(&mut *tx)
                    .await
                    .map_err(store("updating a parked stream"))?;
                tx.commit().await.map_err(store("committing a re-drive"))?;
                return Err(err);
            }
            last = raw.sequence;
        }
        let redriven = Redriven {
            applied: last + 1 - parked.sequence,
            sequence: last,
        };
        stream_query(
            &sql.release_checkpoint,
            consumer,
            aggregate_type,
            aggregate_id,
        )
        .bind(to_i64(last, "sequence")?)
        .execute(&mut *tx)
        .await
        .map_err(store("releasing a parked stream"))?;
        self.finish_redrive(&mut tx, consumer, (aggregate_type, aggregate_id), &redriven)
            .await?;
        tx.commit().await.map_err(store("committing a re-drive"))?;
        info!(
            consumer,
            aggregate_type,
            aggregate_id,
            applied = redriven.applied,
            "parked stream re-driven"
        );
        Ok(Some(redriven))
    }

    /// Skips the first parked event of a stream `consumer` parked, on an operator's
    /// explicit decision (recorded in `parking_log` with `reason`). The stream stays
    /// parked at the next event: re-drive it to apply the rest. Returns the skipped
    /// sequence, or `None` when the stream is not parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn skip_parked(
        &self,
        consumer: &str,
        aggregate_type: &str,
        aggregate_id: &str,
        reason: &str,
    ) -> Result<Option<u64>, Error> {
        let sql = &self.inner.parking;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(store("beginning a skip"))?;
        // The checkpoint row first, as every applier locks it first.
        let checkpoint = stream_query(&sql.lock_checkpoint, consumer, aggregate_type, aggregate_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store("locking a stream checkpoint"))?;
        let row = stream_query(&sql.lock_parked, consumer, aggregate_type, aggregate_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store("locking a parked stream"))?;
        let Some(parked) = row.as_ref().map(parked_stream).transpose()? else {
            return Ok(None);
        };
        // For a projection the first unapplied event is the one after its checkpoint; a
        // handler's re-drive may have moved the parked sequence past it.
        let skipped = match checkpoint {
            Some(row) => {
                let sequence: i64 = row.try_get(0).map_err(store("decoding a checkpoint"))?;
                (to_u64(sequence, "sequence")? + 1).max(parked.sequence)
            }
            None => parked.sequence,
        };
        stream_query(&sql.skip_checkpoint, consumer, aggregate_type, aggregate_id)
            .bind(to_i64(skipped, "sequence")?)
            .execute(&mut *tx)
            .await
            .map_err(store("skipping a parked event"))?;
        stream_query(&sql.update_parked, consumer, aggregate_type, aggregate_id)
            .bind(to_i64(skipped + 1, "sequence")?)
            .bind(format!("event {skipped} skipped: {reason}"))
            .execute(&mut *tx)
            .await
            .map_err(store("skipping a parked event"))?;
        log(
            &mut tx,
            sql,
            consumer,
            (aggregate_type, aggregate_id),
            "skipped",
            skipped,
            reason,
        )
        .await?;
        tx.commit().await.map_err(store("committing a skip"))?;
        warn!(
            consumer,
            aggregate_type,
            aggregate_id,
            sequence = skipped,
            reason,
            "operator skipped a parked event"
        );
        Ok(Some(skipped))
    }

    async fn read_stream_from(
        &self,
        conn: &mut PgConnection,
        aggregate_type: &str,
        aggregate_id: &str,
        from: u64,
    ) -> Result<Vec<EventEnvelope<RawEvent>>, Error> {
        let rows = sqlx::query(&self.inner.parking.read_stream_from)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(to_i64(from, "sequence")?)
            .fetch_all(&mut *conn)
            .await
            .map_err(store("reading a parked stream"))?;
        rows.iter().map(row::raw).collect()
    }

    async fn finish_redrive(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        stream: (&str, &str),
        redriven: &Redriven,
    ) -> Result<(), Error> {
        let sql = &self.inner.parking;
        stream_query(&sql.unpark, consumer, stream.0, stream.1)
            .execute(&mut *conn)
            .await
            .map_err(store("releasing a parked stream"))?;
        log(
            conn,
            sql,
            consumer,
            stream,
            "redriven",
            redriven.sequence,
            &format!("{} events applied", redriven.applied),
        )
        .await
    }

    async fn record_failed_redrive(
        &self,
        consumer: &str,
        stream: (&str, &str),
        from: u64,
        err: &Error,
    ) {
        let Ok(from) = to_i64(from, "sequence") else {
            return;
        };
        let recorded = stream_query(
            &self.inner.parking.update_parked,
            consumer,
            stream.0,
            stream.1,
        )
        .bind(from)
        .bind(error_text(err))
        .execute(&self.inner.pool)
        .await;
        if let Err(db) = recorded {
            warn!(error = %db, "recording a failed re-drive failed");
        }
    }
}

/// A statement whose first three parameters are the consumer and the stream.
fn stream_query<'q>(
    sql: &'q str,
    consumer: &'q str,
    aggregate_type: &'q str,
    aggregate_id: &'q str,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(consumer)
        .bind(aggregate_type)
        .bind(aggregate_id)
}

/// Parks `stream` for `consumer` on `conn` (inside the caller's transaction, if any).
pub(crate) async fn park_in(
    conn: &mut PgConnection,
    sql: &ParkingSql,
    consumer: &str,
    stream: (&str, &str),
    sequence: u64,
    error: &str,
    held: u64,
) -> Result<(), Error> {
    stream_query(&sql.park, consumer, stream.0, stream.1)
        .bind(to_i64(sequence, "sequence")?)
        .bind(error)
        .bind(to_i64(held, "count")?)
        .execute(&mut *conn)
        .await
        .map_err(store("parking a stream"))?;
    warn!(
        consumer,
        aggregate_type = stream.0,
        aggregate_id = stream.1,
        sequence,
        error,
        "stream parked: its later events wait behind it; other streams go on"
    );
    Ok(())
}

/// Adds to the held counts of parked streams.
pub(crate) async fn hold_in(
    conn: &mut PgConnection,
    sql: &ParkingSql,
    consumer: &str,
    held: &[((&str, &str), u64)],
) -> Result<(), Error> {
    if held.is_empty() {
        return Ok(());
    }
    let types: Vec<&str> = held.iter().map(|((t, _), _)| *t).collect();
    let ids: Vec<&str> = held.iter().map(|((_, i), _)| *i).collect();
    let counts = held
        .iter()
        .map(|(_, n)| to_i64(*n, "count"))
        .collect::<Result<Vec<i64>, Error>>()?;
    sqlx::query(&sql.hold)
        .bind(consumer)
        .bind(&types)
        .bind(&ids)
        .bind(&counts)
        .execute(&mut *conn)
        .await
        .map_err(store("counting held events"))?;
    Ok(())
}

impl PgEventStore {
    /// Asks the running consumer `consumer` (a projection's checkpoint key or a
    /// handler's group) to re-drive its parked stream: it picks the request up within a
    /// second or so and runs [`redrive_projection`](PgEventStore::redrive_projection) or
    /// [`redrive_handler`](PgEventStore::redrive_handler) with its own code. What
    /// `thalo dlq redrive` does. Returns whether the stream is parked (and so the request
    /// was recorded, in `parking_log` too, with `note`).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn request_redrive(
        &self,
        consumer: &str,
        aggregate_type: &str,
        aggregate_id: &str,
        note: &str,
    ) -> Result<bool, Error> {
        let sql = &self.inner.parking;
        let requested = stream_query(&sql.request_redrive, consumer, aggregate_type, aggregate_id)
            .bind(note)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store("requesting a re-drive"))?;
        Ok(requested.is_some())
    }

    /// The streams `consumer` was asked to re-drive, oldest request first.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn redrive_requests(&self, consumer: &str) -> Result<Vec<(String, String)>, Error> {
        sqlx::query_as(&self.inner.parking.redrive_requests)
            .bind(consumer)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store("reading re-drive requests"))
    }

    /// Withdraws a re-drive request after a failed attempt, recording `error` in
    /// `parking_log` (`redrive_failed`); the stream stays parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn fail_redrive_request(
        &self,
        consumer: &str,
        aggregate_type: &str,
        aggregate_id: &str,
        error: &str,
    ) -> Result<(), Error> {
        let sql = &self.inner.parking;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(store("beginning to withdraw a re-drive request"))?;
        stream_query(
            &sql.clear_redrive_request,
            consumer,
            aggregate_type,
            aggregate_id,
        )
        .execute(&mut *tx)
        .await
        .map_err(store("withdrawing a re-drive request"))?;
        let sequence = self
            .parked_stream(consumer, aggregate_type, aggregate_id)
            .await?
            .map_or(0, |p| p.sequence);
        log(
            &mut tx,
            sql,
            consumer,
            (aggregate_type, aggregate_id),
            "redrive_failed",
            sequence,
            error,
        )
        .await?;
        tx.commit()
            .await
            .map_err(store("committing a withdrawn re-drive request"))?;
        Ok(())
    }
}

async fn log(
    conn: &mut PgConnection,
    sql: &ParkingSql,
    consumer: &str,
    stream: (&str, &str),
    action: &str,
    sequence: u64,
    detail: &str,
) -> Result<(), Error> {
    stream_query(&sql.log, consumer, stream.0, stream.1)
        .bind(action)
        .bind(to_i64(sequence, "sequence")?)
        .bind(detail)
        .execute(&mut *conn)
        .await
        .map_err(store("recording a parking decision"))?;
    Ok(())
}

/// The first missing sequence in `envelopes`, which should run from `from` without gaps.
fn first_gap<E>(envelopes: &[EventEnvelope<E>], from: u64) -> Option<u64> {
    (from..)
        .zip(envelopes)
        .find(|(expected, envelope)| envelope.sequence != *expected)
        .map(|(expected, _)| expected)
}

/// An error with its causes, for the record.
fn error_text(err: &Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
