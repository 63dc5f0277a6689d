//! The outbox relay: publishes stored events from the Postgres outbox to Kafka.
//!
//! # Delivery guarantee: at least once, in order per aggregate
//!
//! The relay never deletes an outbox row before Kafka has acknowledged its message with
//! `acks=all`, so an event that was committed to the store reaches Kafka even if the
//! relay, the database or the broker fails at any point. The price is duplicates: if the
//! relay dies after Kafka acknowledged a batch and before it deleted the rows, the next
//! relay publishes those rows again. Consumers must tolerate duplicates, and Thalo's do:
//! Postgres projections skip any event at or below their per-stream checkpoint.
//!
//! Per-aggregate order holds because
//!
//! 1. one aggregate's rows are read in outbox order, which is sequence order (see
//!    [`outbox`](crate::outbox));
//! 2. they are all produced with the aggregate id as key, so they go to one partition;
//! 3. the producer is idempotent (`enable.idempotence=true`): librdkafka retries a
//!    failed request without reordering or duplicating it within the partition;
//! 4. only one relay publishes at a time (a Postgres advisory lock), and a relay only
//!    deletes rows while it still holds the lock, because the lock and the deletes use
//!    the same database session;
//! 5. messages never time out locally (`message.timeout.ms=0`): librdkafka retries a
//!    message until it is delivered or rejected for good, and the broker's sequence
//!    check means a later message of a partition is never written around an earlier
//!    one that was not;
//! 6. after a failure, the relay deletes, per aggregate, only the rows before that
//!    aggregate's first failed message, and republishes the rest in order.

use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Connection, PgPool};
use thalo::Error;
use thalo_postgres::{PgEventStore, SchemaName};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::backoff::sleep_or_cancel;
use crate::message::encode_headers;
use crate::outbox::{OutboxRow, OutboxSql, RelayLag};
use crate::topic::{create_with, TopicNaming, TopicSettings};
use crate::RetryPolicy;

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
/// use thalo_kafka::{shutdown_signal, KafkaRelay, TopicNaming};
///
/// let pool = PgPool::connect("postgres://postgres@127.0.0.1:5432/bank")
///     .await
///     .map_err(|e| thalo::Error::store("connecting", e))?;
/// let relay = KafkaRelay::new(pool, "127.0.0.1:9092")
///     .with_topic_naming(TopicNaming::prefixed("bank."))
///     .with_batch_size(500);
/// // Runs until Ctrl-C or SIGTERM, then finishes the batch in hand.
/// relay.run(shutdown_signal()).await?;
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
struct RelayConfig {
    brokers: String,
    schema: SchemaName,
    batch_size: usize,
    poll_interval: Duration,
    lock_retry_interval: Duration,
    lag_log_interval: Duration,
    shutdown_grace: Duration,
    retry: RetryPolicy,
    topic_naming: TopicNaming,
    topic_settings: TopicSettings,
    producer_config: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct RelayState {
    active: AtomicBool,
    published: AtomicU64,
    batches: AtomicU64,
    failed: AtomicU64,
}

/// What a relay has done so far (see [`KafkaRelay::status`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// Whether this relay holds the outbox lock and publishes (the others stand by).
    pub active: bool,
    /// Events published and deleted from the outbox.
    pub published: u64,
    /// Batches published.
    pub batches: u64,
    /// Messages Kafka did not acknowledge (they stay in the outbox and are retried).
    pub failed: u64,
}

impl KafkaRelay {
    /// Default number of outbox rows per batch.
    pub const DEFAULT_BATCH_SIZE: usize = 1000;

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
            },
            state: Arc::default(),
        }
    }

    /// A relay for `store`'s outbox (its pool and schema).
    pub fn from_store(store: &PgEventStore, brokers: impl Into<String>) -> Self {
        KafkaRelay::new(store.pool().clone(), brokers).with_schema(store.schema().clone())
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

    /// How often the active relay logs its lag (default 30 s).
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

    /// Backoff after a failed batch or a lost connection (default 100 ms doubling up
    /// to 30 s; `max_attempts` is ignored: the relay never gives up).
    #[must_use]
    pub fn with_backoff(mut self, retry: RetryPolicy) -> Self {
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

    /// Sets a librdkafka producer property (e.g. `compression.type`, `linger.ms`,
    /// security settings). `enable.idempotence`, `acks` and `message.timeout.ms` cannot
    /// be changed: the guarantees depend on them (see the [module docs](self)).
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.producer_config.push((key.into(), value.into()));
        self
    }

    /// What this relay has done so far. Clones of a relay share their status.
    pub fn status(&self) -> RelayStatus {
        RelayStatus {
            active: self.state.active.load(Ordering::SeqCst),
            published: self.state.published.load(Ordering::SeqCst),
            batches: self.state.batches.load(Ordering::SeqCst),
            failed: self.state.failed.load(Ordering::SeqCst),
        }
    }

    /// How many events wait in the outbox and how old the oldest is.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn lag(&self) -> Result<RelayLag, Error> {
        OutboxSql::new(&self.config.schema).lag(&self.pool).await
    }

    /// Runs the relay until `shutdown` is cancelled: stands by until it holds the outbox
    /// lock, then publishes. On shutdown it waits (up to the
    /// [grace period](KafkaRelay::with_shutdown_grace)) for the batch in hand, deletes
    /// what was acknowledged, and releases the lock.
    ///
    /// Broker and database failures are logged and retried; they do not end the relay.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Broker`] when the Kafka clients cannot be created (invalid
    /// configuration).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), Error> {
        let sql = OutboxSql::new(&self.config.schema);
        let mut kafka = Kafka::new(&self.config)?;
        let mut failures = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let mut conn = match self.acquire_lock(&sql, &shutdown).await {
                Ok(Some(conn)) => conn,
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
            info!(schema = %self.config.schema, "relay holds the outbox lock and is publishing");
            let result = self.lead(&sql, &mut conn, &mut kafka, &shutdown).await;
            self.state.active.store(false, Ordering::SeqCst);
            match result {
                Ok(()) => {
                    // Shutdown: hand the outbox over at once instead of when the
                    // session times out.
                    if let Err(err) = sql.unlock(&mut conn).await {
                        debug!(error = %err, "releasing the outbox lock failed; closing the session releases it");
                    }
                    let _ = conn.close().await;
                    info!("relay stopped");
                    return Ok(());
                }
                Err(err) => {
                    // The session (and with it the lock) is gone or unusable. Another
                    // relay may take over; this one competes for the lock again.
                    failures += 1;
                    warn!(error = %crate::message::error_chain(&err), "relay lost its Postgres session; reconnecting");
                    drop(conn);
                    if !sleep_or_cancel(self.config.retry.backoff(failures), &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Takes the outbox lock on a dedicated session, waiting while another relay has it.
    /// `None` on shutdown.
    async fn acquire_lock(
        &self,
        sql: &OutboxSql,
        shutdown: &CancellationToken,
    ) -> Result<Option<PgConnection>, Error> {
        // Detached: the session must live exactly as long as we hold the lock, and must
        // never go back to the pool (another user of the pool would inherit the lock).
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| Error::store("connecting to take the outbox lock", e))?
            .detach();
        let mut standing_by = false;
        loop {
            let locked = sql
                .try_lock(&mut conn)
                .await
                .map_err(|e| Error::store("taking the outbox lock", e))?;
            if locked {
                return Ok(Some(conn));
            }
            if !standing_by {
                info!(schema = %self.config.schema, "another relay holds the outbox lock; standing by");
                standing_by = true;
            }
            if !sleep_or_cancel(self.config.lock_retry_interval, shutdown).await {
                let _ = conn.close().await;
                return Ok(None);
            }
        }
    }

    /// Publishes batches while this relay holds the lock. `Ok` on shutdown, `Err` when
    /// the session failed.
    async fn lead(
        &self,
        sql: &OutboxSql,
        conn: &mut PgConnection,
        kafka: &mut Kafka,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let mut listener = self.listen(sql).await;
        let mut failures = 0;
        let mut last_lag_log = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Notifications that arrived until now are answered by this read.
            if let Some(listener) = listener.as_mut() {
                while listener.next_buffered().is_some() {}
            }
            let fetch_started = Instant::now();
            let rows = sql.fetch_batch(conn, self.config.batch_size).await?;
            let fetch_elapsed = fetch_started.elapsed();
            if rows.is_empty() {
                failures = 0;
                self.wait_for_events(sql, &mut listener, shutdown).await;
                continue;
            }

            let span = info_span!(
                "relay_batch",
                rows = rows.len(),
                first_outbox_id = rows.first().map_or(0, |r| r.id),
                last_outbox_id = rows.last().map_or(0, |r| r.id),
            );
            let started = Instant::now();
            let outcome = kafka
                .publish(&rows, &self.config, shutdown)
                .instrument(span.clone())
                .await;
            // Delete on the session that holds the lock: if the session is gone, this
            // fails and the rows stay for whoever holds the lock next.
            let publish_elapsed = started.elapsed();
            let deleted = sql.delete(conn, &outcome.delivered).await?;
            self.state.published.fetch_add(deleted, Ordering::SeqCst);
            self.state.batches.fetch_add(1, Ordering::SeqCst);
            span.in_scope(|| {
                debug!(
                    delivered = outcome.delivered.len(),
                    failed = outcome.failed,
                    fetch_ms = fetch_elapsed.as_millis() as u64,
                    publish_ms = publish_elapsed.as_millis() as u64,
                    delete_ms = (started.elapsed() - publish_elapsed).as_millis() as u64,
                    "batch published"
                );
            });

            if last_lag_log.elapsed() >= self.config.lag_log_interval {
                last_lag_log = Instant::now();
                match sql.lag(&self.pool).await {
                    Ok(lag) => info!(
                        pending = lag.pending,
                        oldest_age_ms = lag.oldest_age.map_or(0, |a| a.as_millis() as u64),
                        published = self.state.published.load(Ordering::SeqCst),
                        "relay lag"
                    ),
                    Err(err) => debug!(error = %err, "could not measure the relay lag"),
                }
            }

            if outcome.failed > 0 || outcome.error.is_some() {
                failures += 1;
                self.state
                    .failed
                    .fetch_add(outcome.failed as u64, Ordering::SeqCst);
                let delay = self.config.retry.backoff(failures);
                warn!(
                    failed = outcome.failed,
                    delivered = outcome.delivered.len(),
                    error = outcome.error.as_deref().unwrap_or("unknown"),
                    retry_in_ms = delay.as_millis() as u64,
                    "Kafka did not acknowledge every message; the rest stay in the outbox and are retried in order"
                );
                kafka.recover(&self.config);
                if !sleep_or_cancel(delay, shutdown).await {
                    return Ok(());
                }
            } else {
                failures = 0;
            }
        }
    }

    async fn listen(&self, sql: &OutboxSql) -> Option<PgListener> {
        let result = async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(&sql.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match result {
            Ok(listener) => Some(listener),
            Err(err) => {
                warn!(error = %err, channel = sql.channel, "cannot LISTEN; polling only until the next reconnect");
                None
            }
        }
    }

    /// Waits for a notification, the poll interval, or shutdown.
    async fn wait_for_events(
        &self,
        sql: &OutboxSql,
        listener: &mut Option<PgListener>,
        shutdown: &CancellationToken,
    ) {
        let poll = self.config.poll_interval;
        match listener {
            Some(l) => {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    received = tokio::time::timeout(poll, l.recv()) => {
                        if let Ok(Err(err)) = received {
                            // PgListener reconnects on the next `recv`; until then the
                            // poll interval keeps the relay going.
                            warn!(error = %err, "LISTEN connection failed; polling");
                            sleep_or_cancel(poll, shutdown).await;
                        }
                    }
                }
            }
            None => {
                sleep_or_cancel(poll, shutdown).await;
                *listener = self.listen(sql).await;
            }
        }
    }
}

/// The outcome of publishing one batch.
#[derive(Debug, Default)]
struct BatchOutcome {
    /// Outbox ids that may be deleted.
    delivered: Vec<i64>,
    /// Messages that were not acknowledged (or not sent because an earlier message of
    /// their aggregate was not).
    failed: usize,
    /// The first error, for the log.
    error: Option<String>,
}

/// The relay's Kafka clients.
struct Kafka {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist.
    topics: HashSet<String>,
    /// Aggregate type -> topic.
    names: HashMap<String, String>,
}

impl Kafka {
    fn new(config: &RelayConfig) -> Result<Self, Error> {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(|e| Error::broker("creating the Kafka admin client", e))?;
        Ok(Kafka {
            producer: producer(config)?,
            admin,
            topics: HashSet::new(),
            names: HashMap::new(),
        })
    }

    /// After a failed batch: a producer whose idempotence state is broken (a fatal
    /// error, e.g. the broker lost the producer id) cannot send again and is replaced.
    /// A new producer id starts new sequences; ordering still holds because the
    /// undelivered rows are republished in order by the new producer.
    fn recover(&mut self, config: &RelayConfig) {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            error!(
                ?code,
                reason, "the Kafka producer hit a fatal error; creating a new one"
            );
            match producer(config) {
                Ok(p) => self.producer = p,
                Err(err) => error!(error = %err, "cannot create a new producer; retrying later"),
            }
        }
    }

    fn topic_of(&mut self, naming: &TopicNaming, aggregate_type: &str) -> String {
        self.names
            .entry(aggregate_type.to_owned())
            .or_insert_with(|| naming.topic(aggregate_type))
            .clone()
    }

    async fn publish(
        &mut self,
        rows: &[OutboxRow],
        config: &RelayConfig,
        shutdown: &CancellationToken,
    ) -> BatchOutcome {
        let topics: Vec<String> = rows
            .iter()
            .map(|r| self.topic_of(&config.topic_naming, &r.envelope.aggregate_type))
            .collect();
        let missing: Vec<String> = topics
            .iter()
            .filter(|t| !self.topics.contains(*t))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            if let Err(err) = create_with(&self.admin, &missing, &config.topic_settings).await {
                return BatchOutcome {
                    delivered: Vec::new(),
                    failed: rows.len(),
                    error: Some(crate::message::error_chain(&err)),
                };
            }
            self.topics.extend(missing);
        }

        // Enqueue the whole batch before awaiting any delivery report: librdkafka
        // batches the messages per partition and pipelines the requests. Awaiting one
        // send at a time would cost a round trip (and a linger period) per message.
        let mut pending: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(rows.len());
        let mut results: Vec<Option<Result<(), String>>> = vec![None; rows.len()];
        // Aggregates with a message that could not even be enqueued: their later
        // messages are not sent in this batch, or they would overtake it.
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            let aggregate = (topics[i].as_str(), row.envelope.aggregate_id.as_str());
            if blocked.contains(&aggregate) {
                continue;
            }
            let mut record = FutureRecord::to(&topics[i])
                .key(row.envelope.aggregate_id.as_str())
                .payload(row.envelope.event.payload.as_str())
                .headers(encode_headers(&row.envelope))
                .timestamp(row.envelope.timestamp.timestamp_millis());
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((i, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The local queue drains as the broker acknowledges.
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((err, _)) => {
                        results[i] = Some(Err(err.to_string()));
                        blocked.insert(aggregate);
                        break;
                    }
                }
            }
        }

        // Wait for every delivery report. On shutdown, give the batch a grace period;
        // rows whose report did not come stay in the outbox.
        let mut deliveries = pin!(await_deliveries(pending));
        let reports = tokio::select! {
            reports = &mut deliveries => reports,
            () = shutdown.cancelled() => {
                match tokio::time::timeout(config.shutdown_grace, &mut deliveries).await {
                    Ok(reports) => reports,
                    Err(_) => {
                        warn!("shutdown: acknowledgements did not come in time; the batch stays in the outbox");
                        Vec::new()
                    }
                }
            }
        };
        for (i, report) in reports {
            results[i] = Some(report);
        }

        // Decide which rows to delete. Per aggregate, only the rows before its first
        // failure: a failed event must be republished before any later event of its
        // aggregate, so the later ones are kept too (and republished after it, as
        // duplicates if they did arrive). Other aggregates are unaffected: their order
        // is independent.
        //
        // Could a later event of the aggregate have been written while an earlier one
        // failed? No: the idempotent producer numbers each partition's messages and the
        // broker refuses a sequence number that skips one, and without a message
        // timeout (see `producer`) librdkafka never renumbers around a lost message. A
        // permanent rejection (e.g. a message larger than the topic allows) blocks its
        // aggregate until an operator fixes it; the warning names the error.
        let mut outcome = BatchOutcome::default();
        let mut failed_aggregates: HashSet<(&str, &str)> = HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            let aggregate = (topics[i].as_str(), row.envelope.aggregate_id.as_str());
            if failed_aggregates.contains(&aggregate) {
                outcome.failed += 1;
                continue;
            }
            match &results[i] {
                Some(Ok(())) => outcome.delivered.push(row.id),
                Some(Err(err)) => {
                    outcome.failed += 1;
                    outcome.error.get_or_insert_with(|| err.clone());
                    failed_aggregates.insert(aggregate);
                }
                None => {
                    outcome.failed += 1;
                    outcome
                        .error
                        .get_or_insert_with(|| "no delivery report before shutdown".to_owned());
                    failed_aggregates.insert(aggregate);
                }
            }
        }
        outcome
    }
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("topics", &self.topics)
            .finish()
    }
}

async fn await_deliveries(
    pending: Vec<(usize, DeliveryFuture)>,
) -> Vec<(usize, Result<(), String>)> {
    let mut reports = Vec::with_capacity(pending.len());
    for (i, delivery) in pending {
        let report = match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((err, _message))) => Err(err.to_string()),
            Err(_canceled) => Err("the producer was dropped before the delivery report".to_owned()),
        };
        reports.push((i, report));
    }
    reports
}

/// The relay's producer. The guarantees rest on three settings, so user settings cannot
/// change them:
///
/// - `enable.idempotence=true`: the broker deduplicates retried requests and rejects a
///   request that would leave a gap, so retries neither duplicate nor reorder.
/// - `acks=all`: a message counts as delivered only once every in-sync replica has it.
/// - `message.timeout.ms=0` (no local timeout): librdkafka documents that when queued
///   messages of a partition time out while later ones are in flight, it bumps the
///   producer id and sends the later ones anyway, leaving a gap (1, 4, 5). Without a
///   timeout a message is retried until it is delivered or fails for good, so an
///   aggregate's events can never be written around a lost one. A broker outage
///   therefore makes the relay wait for the batch in hand, which is what it should do.
fn producer(config: &RelayConfig) -> Result<FutureProducer, Error> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("linger.ms", "1");
    for (key, value) in &config.producer_config {
        client.set(key, value);
    }
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .create()
        .map_err(|e| Error::broker("creating the Kafka producer", e))
}
