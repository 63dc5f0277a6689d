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
//!
//! With the `opentelemetry` feature, each event of a batch that carries a trace context
//! also gets a `project` span (`projection`, `aggregate_type`, `aggregate_id`,
//! `sequence`, `batch`, `outcome`: `committed` or `rolled_back`, `error`), open while
//! the transaction that applies it runs, so the request's trace shows when its event
//! reached the read model. In a batch its parent is the event's trace context (the
//! relay's `relay_publish` span) and it links to the batch's `consume` span; a message
//! applied on its own gets it as a child of its `handle` span. The spans are made only
//! when OpenTelemetry records the consumer's spans (checked once per batch).
//!
//! # One identity: checkpoints and consumer group
//!
//! A projection is known by its *checkpoint key*: its [`name`](PgProjection::name) for
//! version 1, `name@vN` for [`version`](PgProjection::version) N
//! ([`thalo_postgres::checkpoint_key`]). The key names its stream checkpoints and parked
//! streams in Postgres, and its Kafka consumer group: `<group prefix><checkpoint key>`
//! ([`projection_group_id`]; the prefix is empty unless set with
//! [`KafkaConfig::with_group_prefix`](crate::KafkaConfig::with_group_prefix) or
//! [`KafkaConsumer::with_group_prefix`]). Nothing else names a projection's group, so
//! the two cannot drift apart:
//!
//! - **Renaming a projection, or bumping its version**, gives it new (empty) checkpoints
//!   *and* a new consumer group. A new group starts at the earliest offset still in
//!   Kafka, so the projection is handed every event its topics still hold, from the
//!   beginning, and applies each once. (A stream whose first events the topics no
//!   longer hold, past their retention, parks on the gap: build such a projection from
//!   the store first, as below.) The old group and the old checkpoints stay until they
//!   are deleted (`thalo projection reset <old name> --yes --reset-group`).
//! - **The read model's tables are not touched.** A renamed projection that writes the
//!   same tables applies every event again on top of the rows that are there. To rebuild
//!   a read model, give the projection a new version that writes tables of its own
//!   (`thalo_postgres::ReadModelTable`: `balances_v2` beside `balances_v1`), build it
//!   from the store (events older than the topics' retention are only there), promote
//!   it, and then run it here: its group is new, and it skips, by the stream
//!   checkpoints the rebuild left, every event the rebuild applied (see
//!   `thalo_postgres`'s `versions` docs and `PgSubscription::with_read_model`).
//! - **Moving from an explicit group.** Before groups were derived, a projection's
//!   group was the string given to [`KafkaConsumer::new`]. The first start under the
//!   derived group reads the topics again from the earliest offset; the checkpoints skip
//!   every event applied already (counted in [`ConsumerStats::duplicates`]), so this
//!   costs a re-read, not a re-application. The old group holds nothing but offsets:
//!   delete it with the broker's tools once the new one has caught up.
//!
//! # Errors
//!
//! Which errors of a projection are retried and which park its stream (and go to the
//! dead-letter topic) is said once, in the
//! [crate docs](crate#errors-in-handlers-retry-or-dead-letter).

use thalo::{Error, Event, EventEnvelope, RawEvent, Shutdown};
use thalo_postgres::{PgEventStore, PgProjection};
use tracing::warn;

use crate::consumer::{Apply, Counts};
use crate::{ConsumerStats, KafkaConfig, KafkaConsumer};

/// The Kafka consumer group of the projection with checkpoint key `checkpoint_key`
/// ([`thalo_postgres::checkpoint_key`]): `<group_prefix><checkpoint_key>`. This is the
/// group [`KafkaConsumer::run_projection`] joins; `thalo status` reports the lag of the
/// same groups.
///
/// ```
/// use thalo_kafka::projection_group_id;
/// use thalo_postgres::checkpoint_key;
///
/// assert_eq!(projection_group_id("", &checkpoint_key("balances", 1)), "balances");
/// assert_eq!(projection_group_id("prod.", &checkpoint_key("balances", 2)), "prod.balances@v2");
/// ```
pub fn projection_group_id(group_prefix: &str, checkpoint_key: &str) -> String {
    format!("{group_prefix}{checkpoint_key}")
}

impl KafkaConsumer {
    /// A consumer of the cluster at `brokers` for a Postgres projection, run with
    /// [`run_projection`](KafkaConsumer::run_projection). It takes no group id: the
    /// group is derived from the projection (see the
    /// [module docs](crate::projection#one-identity-checkpoints-and-consumer-group)).
    pub fn for_projection(brokers: impl Into<String>) -> Self {
        KafkaConsumer::new(brokers, String::new())
    }

    /// A consumer for a Postgres projection with the brokers, every property, the topic
    /// naming and the [group prefix](KafkaConfig::with_group_prefix) of `config`. Build
    /// the relay from the same configuration.
    pub fn for_projection_from_kafka_config(config: &KafkaConfig) -> Self {
        KafkaConsumer::from_kafka_config(config, String::new())
    }

    /// Puts `prefix` in front of the consumer group of the projection this consumer
    /// runs (default: none, or the [`KafkaConfig`]'s): group `<prefix><checkpoint key>`.
    #[must_use]
    pub fn with_group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// The consumer group [`run_projection`](KafkaConsumer::run_projection) joins for
    /// `projection`: `<group prefix><checkpoint key>` ([`projection_group_id`]).
    ///
    /// ```
    /// # use thalo::{Error, EventEnvelope};
    /// # #[derive(Clone, Debug)] pub enum AccountEvent { Opened }
    /// # impl thalo::Event for AccountEvent {
    /// #     fn event_type(&self) -> &'static str { "Opened" }
    /// #     fn encode(&self) -> Result<String, Error> { Ok("{}".into()) }
    /// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> { Ok(AccountEvent::Opened) }
    /// #     fn event_types() -> &'static [&'static str] { &["Opened"] }
    /// # }
    /// use thalo_kafka::{KafkaConfig, KafkaConsumer};
    /// use thalo_postgres::PgProjection;
    ///
    /// struct Balances;
    ///
    /// impl PgProjection<AccountEvent> for Balances {
    ///     fn name(&self) -> &str {
    ///         "balances"
    ///     }
    ///
    ///     fn version(&self) -> u32 {
    ///         2
    ///     }
    ///
    ///     async fn handle(
    ///         &self,
    ///         _tx: &mut sqlx::PgConnection,
    ///         _envelope: &EventEnvelope<AccountEvent>,
    ///     ) -> Result<(), Error> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let kafka = KafkaConfig::new("127.0.0.1:9092").with_group_prefix("bank.");
    /// let consumer = KafkaConsumer::for_projection_from_kafka_config(&kafka);
    /// assert_eq!(consumer.projection_group_id(&Balances), "bank.balances@v2");
    /// ```
    pub fn projection_group_id<E, P>(&self, projection: &P) -> String
    where
        E: Event,
        P: PgProjection<E>,
    {
        projection_group_id(
            &self.group_prefix,
            &thalo_postgres::checkpoint_key(projection.name(), projection.version()),
        )
    }

    /// Runs `projection` on the subscribed topics with exactly-once effects, until
    /// `shutdown` is cancelled (see the [module docs](crate::projection)), as a member of
    /// the projection's own consumer group, `<group prefix><checkpoint key>`
    /// ([`projection_group_id`](KafkaConsumer::projection_group_id)). Build the consumer
    /// with [`for_projection`](KafkaConsumer::for_projection) or
    /// [`for_projection_from_kafka_config`](KafkaConsumer::for_projection_from_kafka_config);
    /// a group id given to [`new`](KafkaConsumer::new) is not used (a warning says so
    /// when it differs).
    ///
    /// Messages that are already waiting in a partition's queue are applied together in
    /// one transaction (up to [`with_batch_size`](KafkaConsumer::with_batch_size)); when
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
    /// use thalo_kafka::KafkaConsumer;
    ///
    /// // Consumer group `balances`: the projection's checkpoint key.
    /// KafkaConsumer::for_projection("127.0.0.1:9092")
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
        mut self,
        store: PgEventStore,
        projection: P,
        shutdown: impl Into<Shutdown>,
    ) -> Result<ConsumerStats, Error>
    where
        E: Event,
        P: PgProjection<E> + 'static,
    {
        let group = self.projection_group_id(&projection);
        if !self.group_id.is_empty() && self.group_id != group {
            warn!(
                given = self.group_id,
                group,
                projection = projection.name(),
                "a projection runs in its own consumer group, derived from its name and \
                 version; the group id given to the consumer is not used (build it with \
                 `KafkaConsumer::for_projection`)"
            );
        }
        self.group_id = group;
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
        // The traced events' `project` spans (feature `opentelemetry`), open for the
        // transaction that applies them.
        let spans = crate::trace::project_spans(self.projection.name(), envelopes);
        let applied = self
            .store
            .apply_exactly_once(&self.projection, envelopes)
            .await;
        crate::trace::record_projected(&spans, &applied);
        drop(spans);
        let applied = applied?;
        Ok(Counts {
            duplicates: applied.duplicates as u64,
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
