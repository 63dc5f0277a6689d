//! The transactional outbox, as a publisher (the Kafka relay, or any other) sees it.
//!
//! Every append writes one `outbox` row per event in the statement that stores the
//! event, so an event is in the outbox if and only if it was stored. A publisher takes
//! the outbox through [`PgOutbox`]:
//!
//! 1. **Leadership.** [`PgOutbox::claim`] takes a session-level advisory lock on a
//!    dedicated connection (one publisher per outbox; the others stand by) and
//!    increments the *epoch*, a fencing token that only ever grows. The lock lives
//!    exactly as long as the session, so a publisher that dies frees the outbox.
//! 2. **Fetch.** [`OutboxLeader::fetch`] returns the oldest publishable rows as
//!    envelopes, in outbox order, which is sequence order within an aggregate (the
//!    append of sequence n+1 starts after the append of n has committed). Rows of
//!    parked aggregates, and of aggregates the caller is backing off, are left out, so
//!    they never crowd out the others.
//! 3. **Acknowledge.** [`OutboxLeader::acknowledge`] deletes the rows the broker
//!    acknowledged, on the leader's session and only while its epoch is current.
//! 4. **Park.** [`OutboxLeader::park`] holds an aggregate back when the broker refused
//!    one of its events for good; an operator lists ([`PgOutbox::parked`]), retries
//!    ([`PgOutbox::retry`]) or skips ([`PgOutbox::skip`]) it. Every decision is written
//!    to `parking_log`, never made silently.
//!
//! Before each batch a publisher calls [`OutboxLeader::check`]: a leader whose session
//! was lost, or whose epoch moved on, publishes nothing more.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgListener, PgRow};
use sqlx::{Connection, PgPool, Row};
use thalo::{Error, EventEnvelope, RawEvent};
use tracing::{debug, info, warn};

use crate::error::{store, to_u64};
use crate::{row, PgEventStore, SchemaName};

/// The publisher's view of a [`PgEventStore`]'s outbox: leadership, publishable rows,
/// acknowledgements, parking and lag: leadership (a session-level advisory lock and an
/// epoch that grows on every takeover), fetches in outbox order that leave out parked
/// and held-back aggregates, fenced acknowledgements and parking. See the crate docs'
/// [outbox section](crate#outbox-parking-and-re-drive).
///
/// ```no_run
/// # async fn example(store: thalo_postgres::PgEventStore) -> Result<(), thalo::Error> {
/// use std::time::Duration;
///
/// let outbox = store.outbox();
/// let Some(mut leader) = outbox.claim("relay-1", Duration::from_secs(1), std::future::pending()).await? else {
///     return Ok(());
/// };
/// loop {
///     leader.check().await?; // still the leader?
///     let rows = leader.fetch(1000, &[]).await?;
///     if rows.is_empty() {
///         break;
///     }
///     // ... publish every row, then:
///     let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
///     leader.acknowledge(&ids).await?;
/// }
/// leader.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PgOutbox {
    pool: PgPool,
    schema: SchemaName,
    sql: std::sync::Arc<OutboxSql>,
}

/// One outbox row and its event.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OutboxEntry {
    /// The outbox row's id (outbox order).
    pub id: i64,
    /// The stored event, still encoded.
    pub envelope: EventEnvelope<RawEvent>,
}

/// How far publishing is behind the store.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct OutboxLag {
    /// Outbox rows waiting to be published (parked ones included).
    pub pending: u64,
    /// Age of the oldest waiting event (time since it was stored), if any waits.
    pub oldest_age: Option<Duration>,
    /// Aggregates parked by the publisher.
    pub parked: u64,
}

/// An aggregate whose outbox rows are held back.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedAggregate {
    /// Type name of the aggregate.
    pub aggregate_type: String,
    /// Identity of the aggregate.
    pub aggregate_id: String,
    /// The refused event's outbox row.
    pub outbox_id: i64,
    /// The refused event's global position.
    pub position: u64,
    /// The refused event's stream sequence.
    pub sequence: u64,
    /// Why it was refused.
    pub error: String,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
    /// How many of its events wait in the outbox (the refused one included).
    pub waiting: u64,
}

/// An event that an operator chose not to publish (see [`PgOutbox::skip`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SkippedEvent {
    /// Type name of the aggregate.
    pub aggregate_type: String,
    /// Identity of the aggregate.
    pub aggregate_id: String,
    /// The skipped event's global position.
    pub position: u64,
    /// The skipped event's stream sequence.
    pub sequence: u64,
}

/// Who leads the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxLeaderInfo {
    /// The current epoch (fencing token).
    pub epoch: u64,
    /// The name the leader claimed with.
    pub holder: String,
    /// When it took over.
    pub since: DateTime<Utc>,
}

impl PgEventStore {
    /// The store's outbox, for a publisher (see [`PgOutbox`]).
    pub fn outbox(&self) -> PgOutbox {
        PgOutbox::new(self.pool().clone(), self.schema().clone())
    }
}

impl PgOutbox {
    /// The outbox of the store in `schema` of `pool`'s database.
    pub fn new(pool: PgPool, schema: SchemaName) -> Self {
        let sql = std::sync::Arc::new(OutboxSql::new(&schema));
        PgOutbox { pool, schema, sql }
    }

    /// The schema of the store.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The channel appends notify (`<schema>_events`).
    pub fn channel(&self) -> &str {
        &self.sql.channel
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Takes the leadership if no one holds it, without waiting.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database cannot be reached.
    pub async fn try_claim(&self, holder: &str) -> Result<Option<OutboxLeader>, Error> {
        let mut conn = self.session().await?;
        if self.sql.try_lock(&mut conn).await? {
            return self.lead(conn, holder).await.map(Some);
        }
        let _ = conn.close().await;
        Ok(None)
    }

    /// Takes the leadership, standing by (trying every `retry_interval`) while another
    /// publisher holds it. `None` when `stop` resolves first.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database cannot be reached.
    pub async fn claim(
        &self,
        holder: &str,
        retry_interval: Duration,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<OutboxLeader>, Error> {
        let mut stop = std::pin::pin!(stop);
        let mut conn = self.session().await?;
        let mut standing_by = false;
        loop {
            if self.sql.try_lock(&mut conn).await? {
                return self.lead(conn, holder).await.map(Some);
            }
            if !standing_by {
                info!(schema = %self.schema, holder, "another publisher leads the outbox; standing by");
                standing_by = true;
            }
            tokio::select! {
                () = &mut stop => {
                    let _ = conn.close().await;
                    return Ok(None);
                }
                () = tokio::time::sleep(retry_interval) => {}
            }
        }
    }

    /// A dedicated session: it must live exactly as long as the lock is held, and must
    /// never go back to the pool (another user of the pool would inherit the lock).
    async fn session(&self) -> Result<PgConnection, Error> {
        Ok(self
            .pool
            .acquire()
            .await
            .map_err(store("connecting to lead the outbox"))?
            .detach())
    }

    async fn lead(&self, mut conn: PgConnection, holder: &str) -> Result<OutboxLeader, Error> {
        let epoch: i64 = match sqlx::query_scalar(&self.sql.claim)
            .bind(holder)
            .fetch_one(&mut conn)
            .await
        {
            Ok(epoch) => epoch,
            Err(err) => {
                let _ = conn.close().await;
                return Err(Error::store("starting an outbox epoch", err));
            }
        };
        let epoch = to_u64(epoch, "epoch")?;
        info!(schema = %self.schema, holder, epoch, "leading the outbox");
        Ok(OutboxLeader {
            conn,
            epoch,
            sql: std::sync::Arc::clone(&self.sql),
        })
    }

    /// Who leads the outbox now, if anyone ever did. (The row outlives its leader: check
    /// [`OutboxLag`] and the publisher's own status to see whether it is alive.)
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn leader(&self) -> Result<Option<OutboxLeaderInfo>, Error> {
        let row = sqlx::query(&self.sql.leader)
            .fetch_optional(&self.pool)
            .await
            .map_err(store("reading the outbox leader"))?;
        row.map(|row| {
            Ok(OutboxLeaderInfo {
                epoch: to_u64(get(&row, 0)?, "epoch")?,
                holder: get(&row, 1)?,
                since: get(&row, 2)?,
            })
        })
        .transpose()
    }

    /// Whether a session holds the outbox's leader lock now, that is, whether a relay is
    /// leading (alive) right now; [`leader`](PgOutbox::leader) tells who led last. For
    /// status pages and `thalo status`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn is_led(&self) -> Result<bool, Error> {
        sqlx::query_scalar(LOCK_HELD)
            .bind(&self.sql.lock_name)
            .fetch_one(&self.pool)
            .await
            .map_err(store("looking for the outbox lock"))
    }

    /// How many rows wait, how old the oldest is, and how many aggregates are parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn lag(&self) -> Result<OutboxLag, Error> {
        let row = sqlx::query(&self.sql.lag)
            .fetch_one(&self.pool)
            .await
            .map_err(store("measuring the outbox lag"))?;
        let pending: i64 = get(&row, 0)?;
        let age: Option<f64> = get(&row, 1)?;
        let parked: i64 = get(&row, 2)?;
        Ok(OutboxLag {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_age: age.map(|s| Duration::from_secs_f64(s.max(0.0))),
            parked: u64::try_from(parked).unwrap_or(0),
        })
    }

    /// The parked aggregates, oldest first.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn parked(&self) -> Result<Vec<ParkedAggregate>, Error> {
        let rows = sqlx::query(&self.sql.parked)
            .fetch_all(&self.pool)
            .await
            .map_err(store("listing parked aggregates"))?;
        rows.iter()
            .map(|row| {
                Ok(ParkedAggregate {
                    aggregate_type: get(row, 0)?,
                    aggregate_id: get(row, 1)?,
                    outbox_id: get(row, 2)?,
                    position: to_u64(get(row, 3)?, "position")?,
                    sequence: to_u64(get(row, 4)?, "sequence")?,
                    error: get(row, 5)?,
                    parked_at: get(row, 6)?,
                    waiting: to_u64(get(row, 7)?, "count")?,
                })
            })
            .collect()
    }

    /// Releases a parked aggregate: its events are published again, in order, from the
    /// refused one on (after the cause was fixed, e.g. the topic's size limit raised).
    /// Records the decision in `parking_log` and wakes the publisher. `false` when the
    /// aggregate was not parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn retry(&self, aggregate_type: &str, aggregate_id: &str) -> Result<bool, Error> {
        let released: Option<i64> = sqlx::query_scalar(&self.sql.retry)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(store("retrying a parked aggregate"))?;
        if released.is_some() {
            info!(
                aggregate_type,
                aggregate_id, "parked aggregate released for retry"
            );
            self.wake().await;
        }
        Ok(released.is_some())
    }

    /// Skips the refused event of a parked aggregate: removes it from the outbox (it
    /// stays in the store, and is never published), records the decision and `reason`
    /// in `parking_log`, and releases the aggregate, whose later events are published
    /// next. Consumers will see a gap in the aggregate's sequence and park it in turn
    /// until their own operator decides: nothing is ever skipped silently. `None` when
    /// the aggregate was not parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn skip(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        reason: &str,
    ) -> Result<Option<SkippedEvent>, Error> {
        let row = sqlx::query(&self.sql.skip)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(reason)
            .fetch_optional(&self.pool)
            .await
            .map_err(store("skipping a parked event"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let skipped = SkippedEvent {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            position: to_u64(get(&row, 0)?, "position")?,
            sequence: to_u64(get(&row, 1)?, "sequence")?,
        };
        warn!(
            aggregate_type,
            aggregate_id,
            sequence = skipped.sequence,
            reason,
            "operator skipped a parked event: it will not be published"
        );
        self.wake().await;
        Ok(Some(skipped))
    }

    /// Wakes a publisher waiting on the channel.
    async fn wake(&self) {
        if let Err(err) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.sql.channel)
            .execute(&self.pool)
            .await
        {
            debug!(error = %err, "waking the publisher failed; it finds the change at its next poll");
        }
    }

    /// A waiter for new outbox rows (`LISTEN` on the store's channel, polling when the
    /// connection is lost).
    pub fn waiter(&self, poll_interval: Duration) -> OutboxWaiter {
        OutboxWaiter {
            pool: self.pool.clone(),
            channel: self.sql.channel.clone(),
            poll_interval,
            listener: None,
        }
    }
}

/// The leadership of an outbox, on its own database session (see [`PgOutbox::claim`]).
/// Dropping it closes the session, which releases the lock.
#[derive(Debug)]
pub struct OutboxLeader {
    conn: PgConnection,
    epoch: u64,
    sql: std::sync::Arc<OutboxSql>,
}

impl OutboxLeader {
    /// This leader's epoch: greater than every earlier leader's.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Checks that this is still the leader: the session that holds the lock answers,
    /// and no later leader took a newer epoch. Call it before publishing each batch.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the session is gone (its lock is too) or the epoch
    /// moved on: stop publishing, drop the leader and claim again.
    pub async fn check(&mut self) -> Result<(), Error> {
        let current: Option<i64> = sqlx::query_scalar(&self.sql.check)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(store("checking the outbox leadership"))?;
        match current.map(|e| to_u64(e, "epoch")).transpose()? {
            Some(epoch) if epoch == self.epoch => Ok(()),
            other => Err(Error::store(
                "checking the outbox leadership",
                format!(
                    "epoch {} was superseded (current: {})",
                    self.epoch,
                    other.map_or_else(|| "none".to_owned(), |e| e.to_string())
                ),
            )),
        }
    }

    /// Up to `limit` of the oldest publishable rows, in outbox order: rows of parked
    /// aggregates and of the aggregates in `hold_back` (type, id) are left out, so a
    /// blocked aggregate never takes the place of the others.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails or a row cannot be decoded.
    pub async fn fetch(
        &mut self,
        limit: usize,
        hold_back: &[(String, String)],
    ) -> Result<Vec<OutboxEntry>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = if hold_back.is_empty() {
            sqlx::query(&self.sql.fetch)
                .bind(limit)
                .fetch_all(&mut self.conn)
                .await
        } else {
            let (types, ids): (Vec<&str>, Vec<&str>) = hold_back
                .iter()
                .map(|(t, i)| (t.as_str(), i.as_str()))
                .unzip();
            sqlx::query(&self.sql.fetch_holding_back)
                .bind(limit)
                .bind(&types)
                .bind(&ids)
                .fetch_all(&mut self.conn)
                .await
        }
        .map_err(store("reading the outbox"))?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEntry {
                    id: get(row, 10)?,
                    envelope: row::raw(row)?,
                })
            })
            .collect()
    }

    /// Deletes the rows the broker acknowledged, if this is still the leader (same
    /// session, same epoch); returns how many were deleted.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the statement fails (the session is gone): the rows
    /// stay, and the next leader publishes them again.
    pub async fn acknowledge(&mut self, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        sqlx::query(&self.sql.acknowledge)
            .bind(ids)
            .bind(i64::try_from(self.epoch).unwrap_or(i64::MAX))
            .execute(&mut self.conn)
            .await
            .map(|r| r.rows_affected())
            .map_err(store("deleting published outbox rows"))
    }

    /// Parks `entry`'s aggregate: its rows leave the fetch until an operator retries or
    /// skips it. The error and the time are recorded, in `outbox_parked` and
    /// `parking_log`. Parking an aggregate that is parked already changes nothing, and
    /// so does parking by a leader whose epoch was superseded.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the statement fails.
    pub async fn park(&mut self, entry: &OutboxEntry, error: &str) -> Result<(), Error> {
        let envelope = &entry.envelope;
        sqlx::query(&self.sql.park)
            .bind(&envelope.aggregate_type)
            .bind(&envelope.aggregate_id)
            .bind(entry.id)
            .bind(i64::try_from(envelope.position).unwrap_or(i64::MAX))
            .bind(i64::try_from(envelope.sequence).unwrap_or(i64::MAX))
            .bind(error)
            .bind(i64::try_from(self.epoch).unwrap_or(i64::MAX))
            .execute(&mut self.conn)
            .await
            .map_err(store("parking an aggregate"))?;
        warn!(
            aggregate_type = envelope.aggregate_type,
            aggregate_id = envelope.aggregate_id,
            sequence = envelope.sequence,
            position = envelope.position,
            error,
            "the broker refused an event for good: its aggregate is parked (its later events wait \
             behind it); every other aggregate goes on. Retry it once the cause is fixed, or skip \
             the event (PgOutbox::retry / PgOutbox::skip)"
        );
        Ok(())
    }

    /// Gives up the leadership at once (instead of when the session closes).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when unlocking fails; closing the session releases the
    /// lock anyway.
    pub async fn release(mut self) -> Result<(), Error> {
        let unlocked = self.sql.unlock(&mut self.conn).await;
        let _ = self.conn.close().await;
        unlocked.map(drop)
    }
}

/// Waits for new outbox rows: a notification on the store's channel or the poll
/// interval, whichever comes first.
#[derive(Debug)]
pub struct OutboxWaiter {
    pool: PgPool,
    channel: String,
    poll_interval: Duration,
    listener: Option<PgListener>,
}

impl OutboxWaiter {
    /// Forgets the notifications received so far (call it right before a fetch: the
    /// fetch answers them).
    pub fn clear(&mut self) {
        if let Some(listener) = self.listener.as_mut() {
            while listener.next_buffered().is_some() {}
        }
    }

    /// Starts listening now (it starts on first use otherwise). Call it before the first
    /// fetch, so that a notification sent between that fetch and the first wait is not
    /// lost. `false` when listening failed (the waiter polls and tries again later).
    pub async fn connect(&mut self) -> bool {
        if self.listener.is_none() {
            self.listener = self.listen().await;
        }
        self.listener.is_some()
    }

    /// Waits for a notification or the poll interval. Listening starts on first use and
    /// restarts after a lost connection; until then the poll interval keeps the caller
    /// going.
    pub async fn wait(&mut self) {
        self.wait_up_to(self.poll_interval).await;
    }

    /// [`wait`](OutboxWaiter::wait), for at most `max` (if shorter than the poll
    /// interval). One timeout, so a notification is never lost to a cancelled receive.
    pub async fn wait_up_to(&mut self, max: Duration) {
        let timeout = max.min(self.poll_interval);
        if !self.connect().await {
            tokio::time::sleep(timeout).await;
            return;
        }
        let Some(listener) = self.listener.as_mut() else {
            return;
        };
        if let Ok(Err(err)) = tokio::time::timeout(timeout, listener.recv()).await {
            warn!(error = %err, channel = self.channel, "LISTEN connection failed; polling");
            self.listener = None;
            tokio::time::sleep(timeout).await;
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let result = async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(&self.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match result {
            Ok(listener) => Some(listener),
            Err(err) => {
                warn!(error = %err, channel = self.channel, "cannot LISTEN; polling");
                None
            }
        }
    }
}

fn get<'r, T>(row: &'r PgRow, index: usize) -> Result<T, Error>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(store("decoding an outbox row"))
}

/// Session-level advisory lock: held until released or until the session ends.
/// `hashtextextended` turns the per-schema lock name into the 64-bit key.
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))";
const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";
/// Whether any session of this database holds the advisory lock of `TRY_LOCK` (a
/// session-level lock on one 64-bit key: `objsubid = 1`, the key split over `classid`
/// and `objid`).
const LOCK_HELD: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND ((classid::int8 << 32) | objid::int8) = hashtextextended($1, 0))";

/// The outbox statements of one schema, built once from the validated [`SchemaName`];
/// every value is a bound parameter.
#[derive(Debug)]
struct OutboxSql {
    channel: String,
    /// The text the advisory lock key is hashed from. Unchanged from the first
    /// releases, so an old relay and a new one still exclude each other.
    lock_name: String,
    claim: String,
    check: String,
    leader: String,
    fetch: String,
    fetch_holding_back: String,
    acknowledge: String,
    park: String,
    parked: String,
    retry: String,
    skip: String,
    lag: String,
}

impl OutboxSql {
    fn new(schema: &SchemaName) -> Self {
        let outbox = schema.qualify("outbox");
        let events = schema.qualify("events");
        let leader = schema.qualify("outbox_leader");
        let parked = schema.qualify("outbox_parked");
        let log = schema.qualify("parking_log");
        // The envelope columns in `row::col` order, then the outbox id.
        let select = format!(
            "SELECT e.position, e.event_id, e.aggregate_type, e.aggregate_id, e.sequence, \
             e.event_type, e.event_version, e.payload::text, e.metadata::text, e.created_at, o.id \
             FROM {outbox} o JOIN {events} e ON e.position = o.position \
             WHERE NOT EXISTS (SELECT 1 FROM {parked} p \
                 WHERE p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id)"
        );
        OutboxSql {
            channel: schema.channel(),
            lock_name: format!("thalo_kafka.relay.{schema}.outbox"),
            claim: format!(
                "INSERT INTO {leader} (id, epoch, holder, since) VALUES (1, 1, $1, now()) \
                 ON CONFLICT (id) DO UPDATE \
                 SET epoch = {leader}.epoch + 1, holder = EXCLUDED.holder, since = now() \
                 RETURNING epoch"
            ),
            check: format!("SELECT epoch FROM {leader} WHERE id = 1"),
            leader: format!("SELECT epoch, holder, since FROM {leader} WHERE id = 1"),
            fetch: format!("{select} ORDER BY o.id LIMIT $1"),
            fetch_holding_back: format!(
                "{select} AND NOT EXISTS (SELECT 1 FROM unnest($2::text[], $3::text[]) AS h(t, i) \
                 WHERE h.t = e.aggregate_type AND h.i = e.aggregate_id) \
                 ORDER BY o.id LIMIT $1"
            ),
            acknowledge: format!(
                "DELETE FROM {outbox} WHERE id = ANY($1) \
                 AND EXISTS (SELECT 1 FROM {leader} WHERE id = 1 AND epoch = $2)"
            ),
            park: format!(
                "WITH parked AS ( \
                     INSERT INTO {parked} (aggregate_type, aggregate_id, outbox_id, position, sequence, error) \
                     SELECT $1::text, $2::text, $3::int8, $4::int8, $5::int8, $6::text \
                     WHERE EXISTS (SELECT 1 FROM {leader} WHERE id = 1 AND epoch = $7::int8) \
                     ON CONFLICT DO NOTHING RETURNING 1) \
                 INSERT INTO {log} (consumer, aggregate_type, aggregate_id, action, sequence, position, detail) \
                 SELECT NULL, $1::text, $2::text, 'parked', $5::int8, $4::int8, $6::text FROM parked"
            ),
            parked: format!(
                "SELECT p.aggregate_type, p.aggregate_id, p.outbox_id, p.position, p.sequence, \
                 p.error, p.parked_at, \
                 (SELECT count(*) FROM {outbox} o JOIN {events} e ON e.position = o.position \
                  WHERE e.aggregate_type = p.aggregate_type AND e.aggregate_id = p.aggregate_id) \
                 FROM {parked} p ORDER BY p.parked_at, p.aggregate_type, p.aggregate_id"
            ),
            retry: format!(
                "WITH released AS ( \
                     DELETE FROM {parked} WHERE aggregate_type = $1::text AND aggregate_id = $2::text \
                     RETURNING sequence, position) \
                 INSERT INTO {log} (consumer, aggregate_type, aggregate_id, action, sequence, position) \
                 SELECT NULL, $1::text, $2::text, 'retried', sequence, position FROM released \
                 RETURNING id"
            ),
            skip: format!(
                "WITH released AS ( \
                     DELETE FROM {parked} WHERE aggregate_type = $1::text AND aggregate_id = $2::text \
                     RETURNING outbox_id, sequence, position), \
                 dropped AS (DELETE FROM {outbox} WHERE id IN (SELECT outbox_id FROM released)), \
                 logged AS ( \
                     INSERT INTO {log} (consumer, aggregate_type, aggregate_id, action, sequence, position, detail) \
                     SELECT NULL, $1::text, $2::text, 'skipped', sequence, position, $3::text FROM released) \
                 SELECT position, sequence FROM released"
            ),
            lag: format!(
                "SELECT count(*), \
                 EXTRACT(EPOCH FROM (now() - min(e.created_at)))::float8, \
                 (SELECT count(*) FROM {parked}) \
                 FROM {outbox} o JOIN {events} e ON e.position = o.position"
            ),
        }
    }

    async fn try_lock(&self, conn: &mut PgConnection) -> Result<bool, Error> {
        sqlx::query_scalar(TRY_LOCK)
            .bind(&self.lock_name)
            .fetch_one(conn)
            .await
            .map_err(store("taking the outbox lock"))
    }

    async fn unlock(&self, conn: &mut PgConnection) -> Result<bool, Error> {
        sqlx::query_scalar(UNLOCK)
            .bind(&self.lock_name)
            .fetch_one(conn)
            .await
            .map_err(store("releasing the outbox lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_schema_qualified() {
        let sql = OutboxSql::new(&SchemaName::new("tenant_a").unwrap());
        assert!(sql
            .fetch
            .contains(r#"FROM "tenant_a".outbox o JOIN "tenant_a".events e"#));
        assert!(sql.fetch.contains(r#""tenant_a".outbox_parked"#));
        assert!(sql.acknowledge.contains(r#""tenant_a".outbox_leader"#));
        assert_eq!(sql.channel, "tenant_a_events");
        assert!(sql.lock_name.contains("tenant_a"));
    }
}
