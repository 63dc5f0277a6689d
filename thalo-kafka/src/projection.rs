//! Postgres projections fed from Kafka, with exactly-once effects.
//!
//! # Delivery guarantee: exactly-once effects
//!
//! Kafka delivers at least once: after a consumer crash, everything since the last
//! offset commit comes again, and the relay may have published an event twice. A
//! [`PgProjection`] run by [`KafkaConsumer::run_projection`] is applied through
//! [`PgEventStore::apply_exactly_once`], which changes the read model and the
//! projection's per-stream checkpoint (`stream_checkpoints`: the last applied sequence
//! of each aggregate) in one transaction, and skips every event at or below the
//! checkpoint. So:
//!
//! - crash before the commit: nothing of the event is stored; Kafka redelivers it and
//!   it is applied;
//! - crash after the commit, before the offset is committed: Kafka redelivers it; the
//!   checkpoint says it is applied, and it is skipped;
//! - relay duplicate: same as the previous case.
//!
//! The Kafka offset is only an optimisation (how much is redelivered); the checkpoint in
//! Postgres is the truth. Two consumers that briefly both hold a partition during a
//! rebalance are serialised by the checkpoint row locks.
//!
//! # Traces
//!
//! A batch applied in one transaction is one unit of work: it runs in the consumer's
//! `consume` span, which (feature `opentelemetry`) links to the trace context of each of
//! its messages. A message applied on its own (a partition that is not behind, or the
//! one-by-one retry of a failed batch) runs in its `handle` span, which continues the
//! trace of its `traceparent` header (see the [crate docs](crate#traces)).

use thalo::{Error, Event, EventEnvelope, RawEvent, Shutdown};
use thalo_postgres::{PgEventStore, PgProjection};

use crate::consumer::{Apply, Counts};
use crate::{ConsumerStats, KafkaConsumer};

impl KafkaConsumer {
    /// Runs `projection` on the subscribed topics with exactly-once effects, until
    /// `shutdown` is cancelled (see the [module docs](crate::projection)). Use the
    /// projection's name as the group id.
    ///
    /// Messages that are already waiting in a partition's queue are applied together in
    /// one transaction (up to [`with_max_batch`](KafkaConsumer::with_max_batch)); when
    /// such a batch fails, its messages are retried one by one, so one bad event is
    /// dead-lettered alone.
    ///
    /// ```no_run
    /// # async fn example(store: thalo_postgres::PgEventStore) -> Result<(), thalo::Error> {
    /// # use thalo::{Error, EventEnvelope};
    /// # use thalo_postgres::PgProjection;
    /// # use sqlx::PgConnection;
    /// # #[derive(Clone, Debug)] pub enum AccountEvent { Opened }
    /// # impl thalo::Event for AccountEvent {
    /// #     fn event_type(&self) -> &'static str { "Opened" }
    /// #     fn encode(&self) -> Result<String, Error> { Ok("{}".into()) }
    /// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> { Ok(AccountEvent::Opened) }
    /// #     fn event_types() -> &'static [&'static str] { &["Opened"] }
    /// # }
    /// # struct Balances;
    /// # impl PgProjection<AccountEvent> for Balances {
    /// #     fn name(&self) -> &str { "balances" }
    /// #     async fn handle(&self, _: &mut PgConnection, _: &EventEnvelope<AccountEvent>) -> Result<(), Error> { Ok(()) }
    /// # }
    /// use thalo_kafka::{KafkaConsumer};
    ///
    /// KafkaConsumer::new("127.0.0.1:9092", "balances")
    ///     .with_topic("bank_account")
    ///     .run_projection(store, Balances, thalo::Shutdown::on_signal())
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`KafkaConsumer::run`].
    pub async fn run_projection<E, P>(
        self,
        store: PgEventStore,
        projection: P,
        shutdown: impl Into<Shutdown>,
    ) -> Result<ConsumerStats, Error>
    where
        E: Event,
        P: PgProjection<E> + 'static,
    {
        self.run_with(
            ProjectionApply { store, projection },
            shutdown.into().into_token(),
        )
        .await
    }
}

struct ProjectionApply<P> {
    store: PgEventStore,
    projection: P,
}

impl<E: Event, P: PgProjection<E> + 'static> Apply<E> for ProjectionApply<P> {
    const BATCHES: bool = true;
    const PARKS_IN_STORE: bool = true;

    async fn apply(&self, envelope: &EventEnvelope<E>) -> Result<Counts, Error> {
        self.apply_batch(std::slice::from_ref(envelope)).await
    }

    async fn apply_batch(&self, envelopes: &[EventEnvelope<E>]) -> Result<Counts, Error> {
        let applied = self
            .store
            .apply_exactly_once(&self.projection, envelopes)
            .await?;
        Ok(Counts {
            skipped: applied.skipped as u64,
            held: applied.held as u64,
        })
    }

    /// Parks the stream under the projection's name, next to its checkpoints: the
    /// projection's later events of the stream are held from now on (see
    /// `PgEventStore::redrive_projection`).
    async fn park(
        &self,
        _group: &str,
        raw: &EventEnvelope<RawEvent>,
        sequence: u64,
        error: &str,
    ) -> Result<bool, Error> {
        self.store
            .park_stream(
                &thalo_postgres::checkpoint_key(self.projection.name(), self.projection.version()),
                &raw.aggregate_type,
                &raw.aggregate_id,
                sequence,
                error,
            )
            .await?;
        Ok(true)
    }

    async fn redrive_requested(&self, _group: &str) -> Result<usize, Error> {
        let key = thalo_postgres::checkpoint_key(self.projection.name(), self.projection.version());
        crate::consumer::redrive_requested_with(
            &self.store,
            &key,
            |aggregate_type, aggregate_id| async move {
                self.store
                    .redrive_projection(&self.projection, &aggregate_type, &aggregate_id)
                    .await
            },
        )
        .await
    }
}

/// Whether a database error is an outage that retrying will get past.
pub(crate) fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P: operator
            // intervention (shutdown, crash); 40001/40P01: serialization failure and
            // deadlock, which succeed when retried.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}
