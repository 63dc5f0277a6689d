//! Read-your-writes across processes: waiting until a projection's checkpoints in the
//! store show given events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::Row;
use thalo::{Error, Event, EventEnvelope};

use crate::error::{store, to_i64, to_u64};
use crate::{checkpoint_key, PgEventStore, PgProjection};

/// The first pause between two looks at the checkpoints; it doubles up to
/// [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(50);

impl PgEventStore {
    /// Waits until `projection` has applied `events` (as returned by
    /// [`Repository::execute`](thalo::Repository::execute)): read-your-writes for a
    /// Postgres projection, however it runs ([`PgSubscription`](crate::PgSubscription)
    /// from the store, or a Kafka consumer), in this process or another.
    ///
    /// Both ways apply an event and advance the projection's per-stream checkpoint
    /// (`stream_checkpoints`) in one transaction, so once the checkpoint of each event's
    /// stream is at or past the event's sequence, the read model shows it. Looks at the
    /// checkpoints (one query) every few milliseconds, backing off to every 50 ms.
    /// Returns at once for no events. The checkpoints are those of the projection's
    /// version ([`checkpoint_key`]): pass the version whose read model you read.
    ///
    /// ```no_run
    /// # async fn example(store: thalo_postgres::PgEventStore) -> Result<(), thalo::Error> {
    /// # use thalo::{Error, EventEnvelope};
    /// # use thalo_postgres::PgProjection;
    /// # use sqlx::PgConnection;
    /// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
    /// # pub struct Account { #[identity] id: String }
    /// # #[thalo::commands] impl Account {
    /// #     pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> { Ok(DepositedEvent { amount }) }
    /// # }
    /// # #[thalo::events] impl Account { pub fn deposited(&mut self, amount: i64) { let _ = amount; } }
    /// # struct Balances;
    /// # impl PgProjection<AccountEvent> for Balances {
    /// #     fn name(&self) -> &str { "balances" }
    /// #     async fn handle(&self, _: &mut PgConnection, _: &EventEnvelope<AccountEvent>) -> Result<(), Error> { Ok(()) }
    /// # }
    /// use std::time::Duration;
    /// use thalo::Repository;
    ///
    /// let repo = Repository::new(store.clone());
    /// let stored = repo
    ///     .execute::<Account>(&"acc-1".to_owned(), AccountCommand::Deposit { amount: 5 })
    ///     .await?;
    /// store
    ///     .wait_until_projected(&Balances, &stored, Duration::from_secs(5))
    ///     .await?;
    /// // A query of the balances read model now sees the deposit.
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// - [`Error::Timeout`] when the events are not all applied within `timeout` (the
    ///   projection is behind, or not running).
    /// - [`Error::Handler`] at once when the stream of one of the events is parked for
    ///   the projection (an event failed; the stream's later events wait until an
    ///   operator re-drives or skips it, see `thalo parked`).
    /// - [`Error::Store`] when the checkpoints cannot be read.
    pub async fn wait_until_projected<E, P, X>(
        &self,
        projection: &P,
        events: &[EventEnvelope<X>],
        timeout: Duration,
    ) -> Result<(), Error>
    where
        E: Event,
        P: PgProjection<E>,
    {
        let key = checkpoint_key(projection.name(), projection.version());
        self.wait_until_projected_by_key(&key, events, timeout)
            .await
    }

    /// [`wait_until_projected`](PgEventStore::wait_until_projected) for the projection
    /// whose checkpoints are kept under `key` (its [`checkpoint_key`]: the name for
    /// version 1, `name@vN` for version N), for a process that does not have the
    /// projection's type at hand.
    ///
    /// # Errors
    ///
    /// As [`wait_until_projected`](PgEventStore::wait_until_projected).
    pub async fn wait_until_projected_by_key<X>(
        &self,
        key: &str,
        events: &[EventEnvelope<X>],
        timeout: Duration,
    ) -> Result<(), Error> {
        // The last sequence of each stream: the checkpoint must reach it.
        let mut streams: HashMap<(&str, &str), u64> = HashMap::new();
        for event in events {
            let sequence = streams
                .entry((&event.aggregate_type, &event.aggregate_id))
                .or_default();
            *sequence = (*sequence).max(event.sequence);
        }
        if streams.is_empty() {
            return Ok(());
        }
        let mut target = Streams::default();
        for ((aggregate_type, aggregate_id), sequence) in streams {
            target.types.push(aggregate_type.to_owned());
            target.ids.push(aggregate_id.to_owned());
            target.sequences.push(to_i64(sequence, "sequence")?);
        }
        self.wait_for_streams(key, &target, timeout, Instant::now())
            .await
    }

    /// Waits until `projection` has applied every event of `aggregate_types` stored when
    /// the call began: a settle phase (after a load, a restart, a rebuild) without
    /// reading the events back. One query finds the last sequence of each stream of
    /// those types; then the wait is [`wait_until_projected`](PgEventStore::wait_until_projected)'s.
    /// Returns how many events that is (the sum of the streams' last sequences).
    ///
    /// It reads the `events` table once per call: meant for tests, settle phases and
    /// operations, not for every request (use `wait_until_projected` with the command's
    /// events there).
    ///
    /// # Errors
    ///
    /// As [`wait_until_projected`](PgEventStore::wait_until_projected).
    pub async fn wait_until_caught_up<E, P>(
        &self,
        projection: &P,
        aggregate_types: &[&str],
        timeout: Duration,
    ) -> Result<u64, Error>
    where
        E: Event,
        P: PgProjection<E>,
    {
        let key = checkpoint_key(projection.name(), projection.version());
        self.wait_until_caught_up_by_key(&key, aggregate_types, timeout)
            .await
    }

    /// [`wait_until_caught_up`](PgEventStore::wait_until_caught_up) for the projection
    /// whose checkpoints are kept under `key` (its [`checkpoint_key`]).
    ///
    /// # Errors
    ///
    /// As [`wait_until_projected`](PgEventStore::wait_until_projected).
    pub async fn wait_until_caught_up_by_key(
        &self,
        key: &str,
        aggregate_types: &[&str],
        timeout: Duration,
    ) -> Result<u64, Error> {
        let started = Instant::now();
        let rows = sqlx::query(&format!(
            "SELECT aggregate_type, aggregate_id, max(sequence) FROM {} \
             WHERE aggregate_type = ANY($1) GROUP BY aggregate_type, aggregate_id",
            self.inner.schema.qualify("events")
        ))
        .bind(aggregate_types)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(store("reading the streams' last sequences"))?;
        let mut streams = Streams::default();
        let mut events = 0;
        for row in rows {
            let sequence: i64 = row.get(2);
            events += to_u64(sequence, "sequence")?;
            streams.types.push(row.get(0));
            streams.ids.push(row.get(1));
            streams.sequences.push(sequence);
        }
        if !streams.sequences.is_empty() {
            self.wait_for_streams(key, &streams, timeout, started)
                .await?;
        }
        Ok(events)
    }

    /// Waits until the checkpoints of `key` reach each stream's sequence.
    async fn wait_for_streams(
        &self,
        key: &str,
        streams: &Streams,
        timeout: Duration,
        started: Instant,
    ) -> Result<(), Error> {
        let sql = format!(
            "SELECT k.aggregate_type, k.aggregate_id, k.sequence, c.sequence AS reached, \
                    COALESCE(c.parked, false) AS parked \
             FROM unnest($2::text[], $3::text[], $4::int8[]) AS k(aggregate_type, aggregate_id, sequence) \
             LEFT JOIN {} AS c ON c.projection = $1 AND c.aggregate_type = k.aggregate_type \
                               AND c.aggregate_id = k.aggregate_id \
             WHERE c.sequence IS NULL OR c.sequence < k.sequence \
             ORDER BY k.aggregate_type, k.aggregate_id \
             LIMIT 1",
            self.inner.schema.qualify("stream_checkpoints")
        );
        let mut pause = FIRST_POLL;
        loop {
            let behind = sqlx::query(&sql)
                .bind(key)
                .bind(&streams.types)
                .bind(&streams.ids)
                .bind(&streams.sequences)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(store("reading a projection's checkpoints"))?;
            let Some(row) = behind else {
                return Ok(());
            };
            let aggregate_type: String = row.get("aggregate_type");
            let aggregate_id: String = row.get("aggregate_id");
            let sequence = to_u64(row.get("sequence"), "sequence")?;
            let reached = row
                .get::<Option<i64>, _>("reached")
                .map(|reached| to_u64(reached, "checkpoint"))
                .transpose()?;
            if row.get::<bool, _>("parked") {
                return Err(Error::handler(
                    key,
                    format!(
                        "the stream {aggregate_type} `{aggregate_id}` is parked for projection `{key}` \
                         (an event failed); its event {sequence} waits until it is re-driven or \
                         skipped (`thalo parked`)"
                    ),
                ));
            }
            let elapsed = started.elapsed();
            if elapsed >= timeout {
                let at = match reached {
                    Some(reached) => format!("it is at {reached}"),
                    None => "it has applied none of the stream's events".to_owned(),
                };
                return Err(Error::timeout(
                    format!(
                        "waiting for projection `{key}` to apply event {sequence} of \
                         {aggregate_type} `{aggregate_id}` ({at})"
                    ),
                    timeout,
                ));
            }
            tokio::time::sleep(pause.min(timeout - elapsed)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}

/// Streams and the sequence each must reach, as query parameters.
#[derive(Default)]
struct Streams {
    types: Vec<String>,
    ids: Vec<String>,
    sequences: Vec<i64>,
}
