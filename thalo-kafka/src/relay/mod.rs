//! The outbox relay: publishes stored events from the Postgres outbox to Kafka.
//!
//! # Delivery guarantee: at least once, in order per aggregate
//!
//! The relay never deletes an outbox row before Kafka has acknowledged its message with
//! `acks=all`, so an event that was committed to the store reaches Kafka even if the
//! relay, the database or the broker fails at any point. The price is duplicates: if the
//! relay dies after Kafka acknowledged a batch and before it deleted the rows, the next
//! relay publishes those rows again. Consumers must tolerate duplicates, and Thalo's do:
//! they drop a message whose sequence they have seen already, and Postgres projections
//! skip any event at or below their per-stream checkpoint.
//!
//! Per-aggregate order holds because
//!
//! 1. one aggregate's rows are read in outbox order, which is sequence order (see
//!    [`PgOutbox`]);
//! 2. they are all produced with the aggregate id as key, so they go to one partition;
//! 3. the producer is idempotent (`enable.idempotence=true`) with the gapless guarantee:
//!    librdkafka retries a failed request without reordering or duplicating it, and
//!    stops rather than write a later message around a failed one;
//! 4. after a failure, the relay deletes, per aggregate, only the rows before that
//!    aggregate's first failed message, and republishes the rest in order.
//!
//! # Nothing stalls
//!
//! Failures are per aggregate. A message the broker refuses for good (too large, an
//! invalid topic, not authorised: see [`PgOutbox`]'s parking) *parks* its aggregate: the
//! error is recorded in the `outbox_parked` table with a warning that names the
//! aggregate, the aggregate's rows leave the fetch (its later events wait behind the
//! refused one, in order), and every other aggregate keeps flowing at full speed. An
//! operator lists parked aggregates ([`KafkaRelay::parked`]) and retries one after
//! fixing the cause ([`KafkaRelay::retry`]) or skips the refused event
//! ([`KafkaRelay::skip`], recorded). A retriable failure (a timeout, a broker that is
//! down) backs off only the aggregates it hit.
//!
//! # One publisher: fencing
//!
//! Relays elect a leader with a session-level advisory lock; every takeover increments
//! the outbox's *epoch*. The leader checks before each batch that its session and epoch
//! are current, deletes rows only while they are, and every message carries the epoch
//! in the `thalo_epoch` header. Every delivery report comes within the delivery timeout
//! (`message.timeout.ms`, [`KafkaRelay::with_delivery_timeout`]), so a leader whose
//! broker hangs returns to its loop and stops if it was deposed. Messages a deposed
//! leader had already handed to the broker can still land late; consumers drop a
//! message from an older epoch for an aggregate they have seen a newer epoch of, and any
//! message whose sequence they have seen, so a handler never sees an aggregate's
//! sequence go backwards.
//!
//! # Traces
//!
//! Each batch is a `relay_batch` span (`rows`, `epoch`, `first_outbox_id`,
//! `last_outbox_id`). With the `opentelemetry` feature, when OpenTelemetry records that
//! span, each event of the batch that carries a trace context (the `traceparent` the
//! command that stored it put in its metadata) is also a `relay_publish` span
//! (`topic`, `aggregate_type`, `aggregate_id`, `sequence`, `event_type`, `outbox_id`,
//! and from the acknowledgement `partition` and `offset`, or `error`), open from the
//! send to the broker's acknowledgement. It continues the event's trace (its parent is
//! the `execute` span that stored the event) and links to the batch; its context is
//! the `traceparent` header of the message, so the consumers' spans are its children.
//! When nothing records the batch span (checked once per batch) the relay does no
//! per-event tracing work; otherwise an event without a trace context costs one
//! metadata lookup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use thalo::{Error, Shutdown};
use thalo_postgres::{
    OutboxLag, OutboxLeader, OutboxWaiter, ParkedAggregate, PgEventStore, PgOutbox, SchemaName,
    SkippedEvent,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backoff::sleep_or_cancel;
use crate::topic::{TopicNaming, TopicSettings};
use crate::RetryPolicy;

mod publish;

use publish::{AggregateKey, Kafka};

/// `thalo_relay_is_leader`: 1 while this process's relay leads the outbox, else 0.
const IS_LEADER: &str = "thalo_relay_is_leader";
/// `thalo_relay_failed_total`: messages Kafka did not acknowledge (kept and retried).
const FAILED: &str = "thalo_relay_failed_total";
/// `thalo_outbox_depth`: outbox rows waiting, at the last measurement.
const OUTBOX_DEPTH: &str = "thalo_outbox_depth";
/// `thalo_outbox_oldest_age_seconds`: age of the oldest waiting row (0 when none).
const OUTBOX_OLDEST_AGE: &str = "thalo_outbox_oldest_age_seconds";
/// `thalo_relay_parked_aggregates`: aggregates parked in the outbox.
const PARKED_AGGREGATES: &str = "thalo_relay_parked_aggregates";

/// How far the relay is behind the event store (outbox rows waiting, the age of the
/// oldest, parked aggregates).
pub type RelayLag = OutboxLag;

/// Publishes the events of a Postgres event store to Kafka, from its transactional
/// outbox.
///
/// `thalo_postgres::PgEventStore` writes one outbox row per event in the transaction
/// that stores the event. The relay takes the oldest rows in batches, produces one
/// message per event (topic per aggregate type, key = aggregate id, value = JSON
/// payload, CloudEvents headers: see [`message`](crate::message)), waits until Kafka
/// has acknowledged every message of the batch, and deletes exactly the acknowledged
/// rows. See the [module docs](self) for the guarantees.
///
/// Run one or more relays per outbox: they elect a leader with a session-level Postgres
/// advisory lock, the others stand by and take over within
/// [`lock_retry_interval`](KafkaRelay::with_lock_retry_interval) when the leader's
/// session ends (crash, shutdown, lost connection). Do not put a transaction-mode
/// connection pooler (PgBouncer) between the relay and Postgres: session locks need a
/// real session.
///
/// One batch is in flight at a time: the next batch is read only after every message
/// of the current one has been acknowledged or has failed, which keeps the failure
/// handling per batch simple and exact. Larger batches buy throughput; the price in
/// latency is that an event stored while a batch is in flight waits for that batch.
///
/// The relay wakes up on the store's `LISTEN/NOTIFY` channel (`<schema>_events`) and
/// also polls every [`poll_interval`](KafkaRelay::with_poll_interval), so a lost
/// notification only delays an event. When Kafka or Postgres is unreachable it retries
/// with exponential backoff and carries on where it stopped; it never gives up on an
/// event.
///
/// ```no_run
/// # async fn example() -> Result<(), thalo::Error> {
/// use sqlx::PgPool;
/// use thalo::ResultExt as _;
/// use thalo_kafka::{KafkaRelay, TopicNaming};
///
/// let pool = PgPool::connect("postgres://postgres@127.0.0.1:5432/bank")
///     .await
///     .store_err("connecting")?;
/// let relay = KafkaRelay::new(pool, "127.0.0.1:9092")
///     .with_topic_naming(TopicNaming::prefixed("bank."))
///     .with_batch_size(500);
/// // Runs until Ctrl-C or SIGTERM, then finishes the batch in hand.
/// relay.run(thalo::Shutdown::on_signal()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct KafkaRelay {
    pool: PgPool,
    config: RelayConfig,
    state: Arc<RelayState>,
}

#[derive(Clone, Debug)]
pub(crate) struct RelayConfig {
    pub(crate) brokers: String,
    pub(crate) schema: SchemaName,
    pub(crate) batch_size: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) lock_retry_interval: Duration,
    pub(crate) lag_log_interval: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) topic_naming: TopicNaming,
    pub(crate) topic_settings: TopicSettings,
    pub(crate) producer_config: Vec<(String, String)>,
    pub(crate) delivery_timeout: Duration,
    /// Set by `from_store` for a store whose appends write no outbox rows.
    pub(crate) store_without_outbox: bool,
}

#[derive(Debug, Default)]
struct RelayState {
    running: AtomicBool,
    active: AtomicBool,
    published: AtomicU64,
    batches: AtomicU64,
    failed: AtomicU64,
    parked: AtomicU64,
    epoch: AtomicU64,
}

/// What a relay has done so far (see [`KafkaRelay::status`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStatus {
    /// Whether [`run`](KafkaRelay::run) is running (leading or standing by); `false`
    /// before it started and after it returned.
    pub running: bool,
    /// Whether this relay holds the outbox lock and publishes (the others stand by).
    pub active: bool,
    /// Events published and deleted from the outbox.
    pub published: u64,
    /// Batches published.
    pub batches: u64,
    /// Messages Kafka did not acknowledge (they stay in the outbox and are retried).
    pub failed: u64,
    /// Aggregates this relay parked.
    pub parked: u64,
    /// The epoch of this relay's current or last leadership (0 if it never led).
    pub epoch: u64,
}

impl KafkaRelay {
    /// Default number of outbox rows per batch.
    pub const DEFAULT_BATCH_SIZE: usize = 1000;

    /// Default of [`with_delivery_timeout`](KafkaRelay::with_delivery_timeout).
    pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

    /// A relay for the outbox in the default schema (`thalo`) of `pool`'s database,
    /// publishing to the Kafka cluster at `brokers` (`host:port[,host:port...]`).
    pub fn new(pool: PgPool, brokers: impl Into<String>) -> Self {
        KafkaRelay {
            pool,
            config: RelayConfig {
                brokers: brokers.into(),
                schema: SchemaName::default(),
                batch_size: Self::DEFAULT_BATCH_SIZE,
                poll_interval: Duration::from_secs(1),
                lock_retry_interval: Duration::from_secs(1),
                lag_log_interval: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(10),
                retry: RetryPolicy::new(u32::MAX)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(30)),
                topic_naming: TopicNaming::default(),
                topic_settings: TopicSettings::default(),
                producer_config: Vec::new(),
                delivery_timeout: Self::DEFAULT_DELIVERY_TIMEOUT,
                store_without_outbox: false,
            },
            state: Arc::default(),
        }
    }

    /// A relay for `store`'s outbox (its pool and schema).
    pub fn from_store(store: &PgEventStore, brokers: impl Into<String>) -> Self {
        let mut relay =
            KafkaRelay::new(store.pool().clone(), brokers).with_schema(store.schema().clone());
        relay.config.store_without_outbox = !store.has_outbox();
        relay
    }

    /// The schema of the event store (the one given to `PgEventStore`).
    #[must_use]
    pub fn with_schema(mut self, schema: SchemaName) -> Self {
        self.config.schema = schema;
        self
    }

    /// Outbox rows per batch (default 1000, at least 1). Larger batches give more
    /// throughput; a batch is also the unit that is republished after a crash.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.config.batch_size = batch_size.max(1);
        self
    }

    /// How long to wait for a notification before looking at the outbox anyway
    /// (default 1 s).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// How often a standby relay tries to take the outbox lock (default 1 s).
    #[must_use]
    pub fn with_lock_retry_interval(mut self, interval: Duration) -> Self {
        self.config.lock_retry_interval = interval;
        self
    }

    /// How often the active relay measures its lag (default 30 s): it logs it and sets
    /// the `thalo_outbox_depth`, `thalo_outbox_oldest_age_seconds` and
    /// `thalo_relay_parked_aggregates` gauges (see the crate docs' metrics section).
    /// Each measurement is one query on the outbox; the relay also measures when it
    /// takes the lead.
    #[must_use]
    pub fn with_lag_log_interval(mut self, interval: Duration) -> Self {
        self.config.lag_log_interval = interval;
        self
    }

    /// How long a shutdown waits for the acknowledgements of the batch in hand
    /// (default 10 s). Rows whose acknowledgement did not come are republished later.
    #[must_use]
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// Backoff of an aggregate whose message failed with a retriable error, and after a
    /// lost database connection (default 100 ms doubling up to 30 s; `max_attempts` is
    /// ignored: the relay never gives up). Only the aggregates that failed wait.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.config.retry = retry;
        self
    }

    /// How aggregate types map to topics (default: the aggregate type).
    #[must_use]
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.config.topic_naming = naming;
        self
    }

    /// How missing topics are created (default: 6 partitions, replication factor 1).
    #[must_use]
    pub fn with_topic_settings(mut self, settings: TopicSettings) -> Self {
        self.config.topic_settings = settings;
        self
    }

    /// How long the broker has to acknowledge a message (librdkafka's
    /// `message.timeout.ms`, default 30 s). A message not acknowledged in time counts
    /// as a retriable failure of its aggregate; the bound is what lets a relay whose
    /// broker hangs notice that it lost its leadership (see the [module docs](self)).
    #[must_use]
    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Self {
        self.config.delivery_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Takes the brokers, every property and the topic naming of `config` (security
    /// settings reach the producer and the admin client alike). Build the consumers
    /// from the same [`KafkaConfig`](crate::KafkaConfig).
    #[must_use]
    pub fn with_kafka_config(mut self, config: &crate::KafkaConfig) -> Self {
        self.config.brokers = config.brokers().to_owned();
        for (key, value) in config.properties() {
            self = self.set(key, value);
        }
        self.config.topic_naming = config.topic_naming().clone();
        self
    }

    /// Sets a librdkafka property of the relay's producer and admin client (e.g.
    /// `compression.type`, `linger.ms`, `message.max.bytes`, security settings).
    /// `enable.idempotence`, `enable.gapless.guarantee`, `acks` and
    /// `message.timeout.ms` cannot be changed: the guarantees depend on them (see the
    /// [module docs](self)); set the timeout with
    /// [`with_delivery_timeout`](KafkaRelay::with_delivery_timeout).
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.producer_config.push((key.into(), value.into()));
        self
    }

    /// What this relay has done so far. Clones of a relay share their status.
    pub fn status(&self) -> RelayStatus {
        RelayStatus {
            running: self.state.running.load(Ordering::SeqCst),
            active: self.state.active.load(Ordering::SeqCst),
            published: self.state.published.load(Ordering::SeqCst),
            batches: self.state.batches.load(Ordering::SeqCst),
            failed: self.state.failed.load(Ordering::SeqCst),
            parked: self.state.parked.load(Ordering::SeqCst),
            epoch: self.state.epoch.load(Ordering::SeqCst),
        }
    }

    /// The outbox this relay publishes.
    pub fn outbox(&self) -> PgOutbox {
        PgOutbox::new(self.pool.clone(), self.config.schema.clone())
    }

    /// How many events wait in the outbox, how old the oldest is, and how many
    /// aggregates are parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn lag(&self) -> Result<RelayLag, Error> {
        self.outbox().lag().await
    }

    /// The aggregates the relay parked because the broker refused one of their events
    /// for good (see the [module docs](self)).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn parked(&self) -> Result<Vec<ParkedAggregate>, Error> {
        self.outbox().parked().await
    }

    /// Publishes a parked aggregate's events again, from the refused one on, once the
    /// cause is fixed (e.g. the topic's `max.message.bytes` and the relay's
    /// `message.max.bytes` raised). `false` when it was not parked.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database fails.
    pub async fn retry(&self, aggregate_type: &str, aggregate_id: &str) -> Result<bool, Error> {
        self.outbox().retry(aggregate_type, aggregate_id).await
    }

    /// Skips the refused event of a parked aggregate (it is never published; the
    /// decision and `reason` are recorded) and publishes the aggregate's later events.
    /// See [`PgOutbox::skip`].
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
        self.outbox()
            .skip(aggregate_type, aggregate_id, reason)
            .await
    }

    /// Runs the relay until `shutdown` is cancelled: stands by until it leads the
    /// outbox, then publishes. On shutdown it waits (up to the
    /// [grace period](KafkaRelay::with_shutdown_grace)) for the batch in hand, deletes
    /// what was acknowledged, and releases the leadership.
    ///
    /// Broker and database failures are logged and retried; they do not end the relay.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Broker`] when the Kafka clients cannot be created (invalid
    /// configuration), and [`Error::Config`] when the relay was built
    /// ([`from_store`](KafkaRelay::from_store)) from a store without an outbox.
    pub async fn run(&self, shutdown: impl Into<Shutdown>) -> Result<(), Error> {
        let shutdown = shutdown.into().into_token();
        if self.config.store_without_outbox {
            return Err(Error::config(format!(
                "the event store in schema `{}` writes no outbox rows \
                 (PgEventStoreBuilder::outbox(false)): a relay would publish nothing",
                self.config.schema
            )));
        }
        let outbox = self.outbox();
        let mut kafka = Kafka::new(&self.config)?;
        let holder = holder_name();
        metrics::gauge!(IS_LEADER).set(0.0);
        // Not running (nor leading) any more once this returns or its future is dropped.
        self.state.running.store(true, Ordering::SeqCst);
        let _running = Stopped(&self.state);
        let mut failures = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let claimed = outbox
                .claim(
                    &holder,
                    self.config.lock_retry_interval,
                    shutdown.cancelled(),
                )
                .await;
            let mut leader = match claimed {
                Ok(Some(leader)) => leader,
                Ok(None) => return Ok(()),
                Err(err) => {
                    failures += 1;
                    warn!(error = %crate::message::error_chain(&err), "relay cannot reach Postgres; retrying");
                    if !sleep_or_cancel(self.config.retry.backoff(failures), &shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            failures = 0;
            self.state.active.store(true, Ordering::SeqCst);
            self.state.epoch.store(leader.epoch(), Ordering::SeqCst);
            metrics::gauge!(IS_LEADER).set(1.0);
            info!(schema = %self.config.schema, epoch = leader.epoch(), "relay leads the outbox and is publishing");
            let result = self.lead(&outbox, &mut leader, &mut kafka, &shutdown).await;
            self.state.active.store(false, Ordering::SeqCst);
            metrics::gauge!(IS_LEADER).set(0.0);
            match result {
                Ok(()) => {
                    // Shutdown: hand the outbox over at once instead of when the
                    // session times out.
                    if let Err(err) = leader.release().await {
                        debug!(error = %err, "releasing the outbox lock failed; closing the session releases it");
                    }
                    info!("relay stopped");
                    return Ok(());
                }
                Err(err) => {
                    // The session (and with it the lock) is gone, or the epoch moved on.
                    // Another relay may take over; this one competes again.
                    failures += 1;
                    warn!(error = %crate::message::error_chain(&err), "relay lost its leadership; publishing stopped, competing again");
                    drop(leader);
                    if !sleep_or_cancel(self.config.retry.backoff(failures), &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Publishes batches while this relay leads. `Ok` on shutdown, `Err` when the
    /// leadership was lost.
    async fn lead(
        &self,
        outbox: &PgOutbox,
        leader: &mut OutboxLeader,
        kafka: &mut Kafka,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let mut waiter = outbox.waiter(self.config.poll_interval);
        // Listen before the first fetch: an append between the fetch and the first wait
        // still wakes the relay.
        waiter.connect().await;
        let mut backoff = Backoff::default();
        // Measured at once: a new leader's gauges are current from the start.
        let mut last_lag_log: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if last_lag_log.is_none_or(|at| at.elapsed() >= self.config.lag_log_interval) {
                last_lag_log = Some(Instant::now());
                self.measure_lag(outbox).await;
            }
            // Fencing: a deposed leader publishes nothing more.
            leader.check().await?;
            // Notifications that arrived until now are answered by this read.
            waiter.clear();
            let hold_back = backoff.waiting(Instant::now());
            let fetch_started = Instant::now();
            let rows = leader.fetch(self.config.batch_size, &hold_back).await?;
            let fetch_elapsed = fetch_started.elapsed();
            if rows.is_empty() {
                self.idle(&mut waiter, &backoff, shutdown).await;
                continue;
            }

            let span = info_span!(
                "relay_batch",
                rows = rows.len(),
                epoch = leader.epoch(),
                first_outbox_id = rows.first().map_or(0, |r| r.id),
                last_outbox_id = rows.last().map_or(0, |r| r.id),
            );
            let started = Instant::now();
            let outcome = kafka
                .publish(&rows, leader.epoch(), &self.config, shutdown)
                .instrument(span.clone())
                .await;
            let publish_elapsed = started.elapsed();
            // Deleted on the leader's session and only while its epoch is current: a
            // deposed leader deletes nothing, and the rows stay for the next one.
            let deleted = leader.acknowledge(&outcome.delivered).await?;
            self.state.published.fetch_add(deleted, Ordering::SeqCst);
            self.state.batches.fetch_add(1, Ordering::SeqCst);
            span.in_scope(|| {
                debug!(
                    delivered = outcome.delivered.len(),
                    kept = outcome.kept,
                    fetch_ms = fetch_elapsed.as_millis() as u64,
                    publish_ms = publish_elapsed.as_millis() as u64,
                    delete_ms = (started.elapsed() - publish_elapsed).as_millis() as u64,
                    "batch published"
                );
            });

            for key in &outcome.succeeded {
                backoff.succeeded(key);
            }
            if !outcome.failed.is_empty() {
                self.state
                    .failed
                    .fetch_add(outcome.kept as u64, Ordering::SeqCst);
                metrics::counter!(FAILED).increment(outcome.kept as u64);
                for (key, (entry, failure)) in &outcome.failed {
                    if failure.permanent {
                        leader.park(entry, &failure.error).await?;
                        self.state.parked.fetch_add(1, Ordering::SeqCst);
                        backoff.succeeded(key);
                    } else {
                        let delay = backoff.failed(key.clone(), &self.config.retry);
                        warn!(
                            aggregate_type = key.0,
                            aggregate_id = key.1,
                            sequence = entry.envelope.sequence,
                            error = failure.error,
                            retry_in_ms = delay.as_millis() as u64,
                            "Kafka did not acknowledge an event; its aggregate backs off and is retried in order, the others go on"
                        );
                    }
                }
                kafka.recover(&self.config);
            }
        }
    }

    /// Logs the outbox lag and sets its gauges. A failed measurement leaves the gauges
    /// as they were: the relay's own loop reports the database being down.
    async fn measure_lag(&self, outbox: &PgOutbox) {
        match outbox.lag().await {
            Ok(lag) => {
                metrics::gauge!(OUTBOX_DEPTH).set(lag.pending as f64);
                metrics::gauge!(OUTBOX_OLDEST_AGE)
                    .set(lag.oldest_age.map_or(0.0, |age| age.as_secs_f64()));
                metrics::gauge!(PARKED_AGGREGATES).set(lag.parked as f64);
                info!(
                    pending = lag.pending,
                    parked = lag.parked,
                    oldest_age_ms = lag.oldest_age.map_or(0, |a| a.as_millis() as u64),
                    published = self.state.published.load(Ordering::SeqCst),
                    "relay lag"
                );
            }
            Err(err) => debug!(error = %err, "could not measure the relay lag"),
        }
    }

    /// Waits for a notification, the poll interval, the end of the earliest backoff,
    /// or shutdown.
    async fn idle(
        &self,
        waiter: &mut OutboxWaiter,
        backoff: &Backoff,
        shutdown: &CancellationToken,
    ) {
        let now = Instant::now();
        let until_retry = backoff
            .next_retry()
            .map_or(self.config.poll_interval, |at| {
                at.saturating_duration_since(now)
            });
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = waiter.wait_up_to(until_retry) => {}
        }
    }
}

/// Marks a relay stopped when its `run` ends, however it ends.
struct Stopped<'a>(&'a RelayState);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
        if self.0.active.swap(false, Ordering::SeqCst) {
            metrics::gauge!(IS_LEADER).set(0.0);
        }
    }
}

/// Per-aggregate backoff after retriable failures: only the aggregate that failed
/// waits; the fetch leaves its rows out until its time comes.
#[derive(Debug, Default)]
struct Backoff {
    aggregates: HashMap<AggregateKey, (u32, Instant)>,
}

impl Backoff {
    /// Records a failure; returns how long the aggregate waits.
    fn failed(&mut self, key: AggregateKey, retry: &RetryPolicy) -> Duration {
        let entry = self.aggregates.entry(key).or_insert((0, Instant::now()));
        entry.0 = entry.0.saturating_add(1);
        let delay = retry.backoff(entry.0);
        entry.1 = Instant::now() + delay;
        delay
    }

    fn succeeded(&mut self, key: &AggregateKey) {
        self.aggregates.remove(key);
    }

    /// The aggregates still waiting at `now`. (Their failure counts stay until they
    /// succeed, so the next failure waits longer.)
    fn waiting(&self, now: Instant) -> Vec<AggregateKey> {
        self.aggregates
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(key, _)| key.clone())
            .collect()
    }

    fn next_retry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.aggregates
            .values()
            .map(|(_, until)| *until)
            .filter(|until| *until > now)
            .min()
    }
}

/// How this relay names itself in `outbox_leader`: host and process id.
fn holder_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_relay_refuses_a_store_without_an_outbox() {
        // A lazy pool never connects: the relay must refuse before it touches anything.
        let pool = PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").expect("pool");
        let store = PgEventStore::builder(pool)
            .outbox(false)
            .build()
            .expect("store");
        let relay = KafkaRelay::from_store(&store, "127.0.0.1:1");
        let err = relay
            .run(CancellationToken::new())
            .await
            .expect_err("no outbox");
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(err.to_string().contains("writes no outbox rows"), "{err}");
    }

    #[test]
    fn backoff_is_per_aggregate_and_grows() {
        let retry = RetryPolicy::new(u32::MAX)
            .with_initial_backoff(Duration::from_millis(100))
            .with_max_backoff(Duration::from_secs(30));
        let mut backoff = Backoff::default();
        let a = ("t".to_owned(), "a".to_owned());
        let b = ("t".to_owned(), "b".to_owned());
        let first = backoff.failed(a.clone(), &retry);
        let second = backoff.failed(a.clone(), &retry);
        assert!(second > first);
        assert_eq!(backoff.waiting(Instant::now()), vec![a.clone()]);
        assert!(!backoff.waiting(Instant::now()).contains(&b));
        backoff.succeeded(&a);
        assert!(backoff.waiting(Instant::now()).is_empty());
        assert!(backoff.next_retry().is_none());
    }
}
