//! Consumers: Kafka -> event handlers and projections.
//!
//! # Delivery guarantee: at least once, in order per partition
//!
//! A message's offset is stored only after its handler succeeded (or after the message
//! was written to the dead-letter topic), and only stored offsets are committed. The
//! consumer runs with `enable.auto.offset.store=false` and commits the stored offsets
//! itself: every [commit interval](KafkaConsumer::with_commit_interval), when partitions
//! are revoked, and on shutdown. Whatever happens, a message whose handler did not
//! finish is delivered again, to this consumer or to the group member that takes over
//! its partition. The price is redelivery: after a crash, everything handled since the
//! last commit is handled again. Handlers must be idempotent, or be Postgres
//! projections, whose checkpoint makes redelivery a no-op (see
//! [`KafkaConsumer::run_projection`]).
//!
//! Offsets are committed in order because each partition is handled by one task, one
//! message after the other: committing offset `n` means every message before `n` was
//! handled. (Committing out of order would lose messages: see rdkafka's
//! `examples/at_least_once.rs`.) Partitions are independent and are handled
//! concurrently; since an aggregate's events share a partition, every handler sees
//! each aggregate's events in sequence order.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Message};
use thalo::{AggregateType, Error, Event, EventEnvelope, EventHandler};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::sleep_or_cancel;
use crate::message::{decode_message, error_chain, header, header_pairs};
use crate::topic::{ensure_topics, TopicNaming, TopicSettings};
use crate::RetryPolicy;

/// Runs an [`EventHandler`] (or, with [`run_projection`](KafkaConsumer::run_projection),
/// a Postgres projection) on the events of one or more topics, as a member of a
/// Kafka consumer group.
///
/// - **Group**: one group id per handler or projection. Start the same consumer in
///   several processes to share the partitions; each partition is handled by one member.
/// - **Order**: messages of one partition are handled one after the other, in order;
///   partitions are handled concurrently.
/// - **Offsets**: stored after the handler succeeded and committed periodically, so
///   delivery is at least once (see the [module docs](self)).
/// - **Retries**: a failing handler is retried with exponential backoff up to
///   [`RetryPolicy::max_attempts`] times. Outages are not the message's fault and are
///   retried until they end (or shutdown), without counting against the attempts, so
///   a database restart does not empty a topic into its dead-letter topic. An outage
///   is a lost or refused database connection, a pool timeout, a server shutdown, a
///   serialization failure or deadlock anywhere in the error's chain (with the
///   `postgres` feature), or else an [`Error::Store`] or [`Error::Broker`] returned
///   directly. A handler error that wraps an SQL error such as a constraint violation
///   counts as a failure of the message.
/// - **Dead letters**: a message that cannot be decoded (not JSON, unknown event type,
///   missing headers) or whose handler keeps failing is written to the dead-letter
///   topic (`<topic>.dlq` by default) with its key, value and headers, plus headers that
///   say why ([`header::DLQ_ERROR`] and friends). Then the consumer goes on.
/// - **Shutdown**: when the token is cancelled, the message in hand is finished, the
///   offsets are committed, and the consumer leaves the group. If instead the future
///   is dropped (the task is aborted), nothing more is committed, as after a crash.
///
/// ```no_run
/// # async fn example() -> Result<(), thalo::Error> {
/// use thalo::{Error, Event, EventEnvelope, EventHandler, RawEvent};
/// use thalo_kafka::{shutdown_signal, KafkaConsumer, RetryPolicy};
///
/// # #[derive(Clone, Debug)] struct BankAccountEvent;
/// # impl Event for BankAccountEvent {
/// #     fn event_type(&self) -> &'static str { "X" }
/// #     fn encode(&self) -> Result<String, Error> { Ok("{}".into()) }
/// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> { Ok(BankAccountEvent) }
/// #     fn event_types() -> &'static [&'static str] { &["X"] }
/// # }
/// struct Mailer;
///
/// impl EventHandler<BankAccountEvent> for Mailer {
///     async fn handle(&self, envelope: &EventEnvelope<BankAccountEvent>) -> Result<(), Error> {
///         println!("account {} changed", envelope.aggregate_id);
///         Ok(())
///     }
/// }
///
/// let stats = KafkaConsumer::new("127.0.0.1:9092", "mailer")
///     .with_topic("bank_account")
///     .with_retry(RetryPolicy::new(3))
///     .run(Mailer, shutdown_signal())
///     .await?;
/// println!("handled {} events", stats.handled);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct KafkaConsumer {
    brokers: String,
    group_id: String,
    topics: Vec<TopicSource>,
    naming: TopicNaming,
    topic_settings: TopicSettings,
    retry: RetryPolicy,
    dead_letter: DeadLetterNaming,
    commit_interval: Duration,
    queue_capacity: usize,
    max_batch: usize,
    client_config: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
enum TopicSource {
    Topic(String),
    Aggregate(&'static str),
}

/// Where dead letters go.
#[derive(Clone, Debug)]
enum DeadLetterNaming {
    Suffix(String),
    Topic(String),
}

/// What a consumer did before it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Messages handled successfully.
    pub handled: u64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Events a Postgres projection skipped because it had applied them already
    /// (redeliveries and relay duplicates).
    pub duplicates: u64,
}

impl KafkaConsumer {
    /// A consumer in group `group_id` of the cluster at `brokers`. Add topics with
    /// [`subscribe`](KafkaConsumer::subscribe) or [`with_topic`](KafkaConsumer::with_topic).
    ///
    /// A new group starts at the beginning of each topic (`auto.offset.reset=earliest`),
    /// so a new projection sees every event still in Kafka.
    pub fn new(brokers: impl Into<String>, group_id: impl Into<String>) -> Self {
        KafkaConsumer {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics: Vec::new(),
            naming: TopicNaming::default(),
            topic_settings: TopicSettings::default(),
            retry: RetryPolicy::default(),
            dead_letter: DeadLetterNaming::Suffix(".dlq".to_owned()),
            commit_interval: Duration::from_secs(1),
            queue_capacity: 1000,
            max_batch: 200,
            client_config: Vec::new(),
        }
    }

    /// Subscribes to the topic of aggregate `A` (named by the
    /// [topic naming](KafkaConsumer::with_topic_naming), as the relay names it).
    #[must_use]
    pub fn subscribe<A: AggregateType>(mut self) -> Self {
        self.topics.push(TopicSource::Aggregate(A::TYPE));
        self
    }

    /// Subscribes to `topic`.
    #[must_use]
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(TopicSource::Topic(topic.into()));
        self
    }

    /// How aggregate types map to topics; must match the relay's (default: the
    /// aggregate type).
    #[must_use]
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.naming = naming;
        self
    }

    /// How missing source and dead-letter topics are created.
    #[must_use]
    pub fn with_topic_settings(mut self, settings: TopicSettings) -> Self {
        self.topic_settings = settings;
        self
    }

    /// How failing handlers are retried (default: 5 attempts, 200 ms doubling to 10 s).
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Dead letters of topic `t` go to `t<suffix>` (default suffix `.dlq`).
    #[must_use]
    pub fn with_dead_letter_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dead_letter = DeadLetterNaming::Suffix(suffix.into());
        self
    }

    /// All dead letters go to `topic`.
    #[must_use]
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter = DeadLetterNaming::Topic(topic.into());
        self
    }

    /// How often stored offsets are committed (default 1 s). A longer interval means
    /// fewer commits and more redelivery after a crash.
    #[must_use]
    pub fn with_commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How many received messages may wait per partition (default 1000). When a
    /// partition's queue is full, the consumer stops fetching until it drains.
    #[must_use]
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Most messages a Postgres projection applies in one transaction (default 200).
    /// Only messages that are already waiting are batched, so this never adds latency.
    #[must_use]
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// Sets a librdkafka consumer property (e.g. `session.timeout.ms`,
    /// `auto.offset.reset`, security settings). `enable.auto.commit` and
    /// `enable.auto.offset.store` cannot be changed: the guarantees depend on them.
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.client_config.push((key.into(), value.into()));
        self
    }

    /// The group id.
    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// The topics this consumer subscribes to.
    pub fn topics(&self) -> Vec<String> {
        self.topics
            .iter()
            .map(|t| match t {
                TopicSource::Topic(topic) => topic.clone(),
                TopicSource::Aggregate(aggregate_type) => self.naming.topic(aggregate_type),
            })
            .collect()
    }

    /// The dead-letter topic of `topic`.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        match &self.dead_letter {
            DeadLetterNaming::Suffix(suffix) => format!("{topic}{suffix}"),
            DeadLetterNaming::Topic(dlq) => dlq.clone(),
        }
    }

    /// Feeds the events of the subscribed topics to `handler` until `shutdown` is
    /// cancelled, then finishes the messages in hand, commits and leaves the group.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] when no topic is subscribed, and [`Error::Broker`] when
    /// the consumer cannot be created or subscribed (invalid configuration). Broker
    /// outages while running are retried, not returned.
    pub async fn run<E, H>(
        self,
        handler: H,
        shutdown: CancellationToken,
    ) -> Result<ConsumerStats, Error>
    where
        E: Event,
        H: EventHandler<E> + 'static,
    {
        self.run_with(HandlerApply(handler, PhantomData), shutdown)
            .await
    }

    pub(crate) async fn run_with<E, A>(
        self,
        apply: A,
        shutdown: CancellationToken,
    ) -> Result<ConsumerStats, Error>
    where
        E: Event,
        A: Apply<E>,
    {
        let topics = self.topics();
        if topics.is_empty() {
            return Err(Error::config(
                "the consumer has no topic: call `subscribe` or `with_topic`",
            ));
        }
        let mut needed = topics.clone();
        for topic in &topics {
            let dlq = self.dead_letter_topic(topic);
            if !needed.contains(&dlq) {
                needed.push(dlq);
            }
        }
        // Subscribing to a topic that does not exist yet would leave the consumer
        // without partitions until its next metadata refresh, minutes later.
        let mut failures = 0;
        loop {
            match ensure_topics(&self.brokers, &needed, &self.topic_settings).await {
                Ok(()) => break,
                Err(err) => {
                    failures += 1;
                    let delay = self.retry.backoff(failures);
                    warn!(group = self.group_id, error = %error_chain(&err), retry_in_ms = delay.as_millis() as u64, "cannot create topics; retrying");
                    if !sleep_or_cancel(delay, &shutdown).await {
                        return Ok(ConsumerStats::default());
                    }
                }
            }
        }

        let context = GroupContext {
            group_id: self.group_id.clone(),
            partitions: Mutex::default(),
            commit_on_revoke: AtomicBool::new(true),
        };
        let consumer: StreamConsumer<GroupContext> = self
            .consumer_config()
            .create_with_context(context)
            .map_err(|e| Error::broker("creating the Kafka consumer", e))?;
        let consumer = Arc::new(consumer);
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topic_refs)
            .map_err(|e| Error::broker("subscribing", e))?;
        let dlq_producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| Error::broker("creating the dead-letter producer", e))?;
        info!(group = self.group_id, ?topics, "consumer started");

        let shared = Arc::new(Shared {
            consumer: Arc::clone(&consumer),
            apply,
            dlq_producer,
            config: self,
            stats: StatsCounters::default(),
            _event: PhantomData,
        });
        // If this future is dropped before a graceful shutdown (the task is aborted),
        // behave like a crash: do not commit on the way out.
        let mut guard = AbandonGuard {
            consumer: Some(Arc::clone(&consumer)),
        };

        let stop = CancellationToken::new();
        let mut workers: HashMap<(String, i32), Worker> = HashMap::new();
        let mut turns: HashMap<(String, i32), Arc<tokio::sync::Mutex<()>>> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut commit_tick = tokio::time::interval(shared.config.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(err) = done {
                        error!(group = shared.config.group_id, error = %err, "a partition worker failed");
                    }
                }
                _ = commit_tick.tick() => commit(&consumer, CommitMode::Async, &shared.config.group_id),
                received = consumer.recv() => {
                    let message = match received {
                        Ok(message) => message.detach(),
                        Err(err) => {
                            // librdkafka reconnects and refetches on its own; these are
                            // reports (broker down, partition EOF, ...), not a reason to stop.
                            warn!(group = shared.config.group_id, error = %err, "Kafka consumer error");
                            continue;
                        }
                    };
                    let key = (message.topic().to_owned(), message.partition());
                    let alive = workers
                        .get(&key)
                        .is_some_and(|w| !w.token.is_cancelled() && !w.tx.is_closed());
                    if !alive {
                        // First message of a newly assigned partition.
                        let token = stop.child_token();
                        consumer
                            .context()
                            .lock_partitions()
                            .insert(key.clone(), token.clone());
                        let (tx, rx) = mpsc::channel(shared.config.queue_capacity);
                        let turn = Arc::clone(turns.entry(key.clone()).or_default());
                        tasks.spawn(partition_worker(Arc::clone(&shared), turn, token.clone(), rx));
                        workers.insert(key.clone(), Worker { tx, token });
                    }
                    let Some(worker) = workers.get(&key) else { continue };
                    tokio::select! {
                        // A full queue stops fetching: backpressure.
                        sent = worker.tx.send(message) => {
                            if sent.is_err() {
                                // The partition was revoked meanwhile; its new owner
                                // (maybe us again) starts from the committed offset.
                                debug!(topic = key.0, partition = key.1, "dropped a message of a revoked partition");
                            }
                        }
                        () = shutdown.cancelled() => break,
                    }
                }
            }
        }

        // Graceful shutdown: workers finish the message in hand and store its offset;
        // then everything stored is committed, and the consumer leaves the group.
        info!(group = shared.config.group_id, "consumer shutting down");
        stop.cancel();
        drop(workers);
        while let Some(done) = tasks.join_next().await {
            if let Err(err) = done {
                error!(group = shared.config.group_id, error = %err, "a partition worker failed");
            }
        }
        consumer
            .context()
            .commit_on_revoke
            .store(false, Ordering::SeqCst);
        let group = shared.config.group_id.clone();
        let stats = shared.stats.snapshot();
        guard.consumer = None;
        drop(shared);
        let closing = Arc::clone(&consumer);
        drop(consumer);
        let closed = tokio::task::spawn_blocking(move || {
            commit(&closing, CommitMode::Sync, &group);
            closing.unsubscribe();
            // Dropping the last handle closes the consumer: it leaves the group.
            drop(closing);
        })
        .await;
        if let Err(err) = closed {
            warn!(error = %err, "closing the consumer failed");
        }
        info!(
            handled = stats.handled,
            dead_lettered = stats.dead_lettered,
            "consumer stopped"
        );
        Ok(stats)
    }

    fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        for (key, value) in &self.client_config {
            config.set(key, value);
        }
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        config
    }
}

/// Commits the stored offsets. "No offset" means nothing was stored since the last
/// commit.
fn commit(consumer: &StreamConsumer<GroupContext>, mode: CommitMode, group: &str) {
    match consumer.commit_consumer_state(mode) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(err) => {
            warn!(group, error = %err, "committing offsets failed; retrying at the next commit")
        }
    }
}

/// What the consumer does with decoded events: call a handler, or apply a projection.
pub(crate) trait Apply<E: Event>: Send + Sync + 'static {
    /// Whether [`apply_batch`](Apply::apply_batch) is worth using: then a worker hands
    /// over everything its partition has queued at once.
    const BATCHES: bool = false;

    /// Applies one event. Returns how many events were skipped as already applied.
    fn apply(&self, envelope: &EventEnvelope<E>)
        -> impl Future<Output = Result<u64, Error>> + Send;

    /// Applies events of one partition, in order, all or nothing.
    fn apply_batch(
        &self,
        envelopes: &[EventEnvelope<E>],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        async move {
            let mut skipped = 0;
            for envelope in envelopes {
                skipped += self.apply(envelope).await?;
            }
            Ok(skipped)
        }
    }
}

struct HandlerApply<H, E>(H, PhantomData<fn(E)>);

impl<E: Event, H: EventHandler<E> + 'static> Apply<E> for HandlerApply<H, E> {
    async fn apply(&self, envelope: &EventEnvelope<E>) -> Result<u64, Error> {
        self.0.handle(envelope).await.map(|()| 0)
    }
}

/// Whether an error is an outage (retried without limit) rather than a problem with the
/// message (retried a few times, then dead-lettered).
///
/// With the `postgres` feature, a database error anywhere in the chain decides: lost
/// connections, pool timeouts, server shutdowns, serialization failures and deadlocks
/// are outages; constraint violations and other SQL errors are not. Otherwise
/// [`Error::Store`] and [`Error::Broker`] are outages.
pub(crate) fn is_outage(err: &Error) -> bool {
    #[cfg(feature = "postgres")]
    {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cause {
            if let Some(sqlx_err) = e.downcast_ref::<sqlx::Error>() {
                return crate::projection::is_transient(sqlx_err);
            }
            cause = e.source();
        }
    }
    matches!(err, Error::Store { .. } | Error::Broker { .. })
}

struct Worker {
    tx: mpsc::Sender<OwnedMessage>,
    token: CancellationToken,
}

struct Shared<E, A> {
    consumer: Arc<StreamConsumer<GroupContext>>,
    apply: A,
    dlq_producer: FutureProducer,
    config: KafkaConsumer,
    stats: StatsCounters,
    _event: PhantomData<fn(E)>,
}

#[derive(Default)]
struct StatsCounters {
    handled: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    duplicates: AtomicU64,
}

impl StatsCounters {
    fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            handled: self.handled.load(Ordering::SeqCst),
            dead_lettered: self.dead_lettered.load(Ordering::SeqCst),
            retries: self.retries.load(Ordering::SeqCst),
            duplicates: self.duplicates.load(Ordering::SeqCst),
        }
    }
}

/// Whether the message was dealt with (its offset may be stored) or the worker was
/// stopped first (it will be delivered again).
enum Outcome {
    Done,
    Interrupted,
}

/// Why a message goes to the dead-letter topic.
#[derive(Clone, Copy)]
enum DeadLetterReason {
    Decode,
    Handler,
}

impl DeadLetterReason {
    fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Handler => "handler",
        }
    }
}

/// Handles one partition's messages in order. `turn` makes a worker for a partition
/// that was revoked and assigned again wait until the previous worker has finished its
/// message in hand, so one partition never has two messages in progress at once.
async fn partition_worker<E: Event, A: Apply<E>>(
    shared: Arc<Shared<E, A>>,
    turn: Arc<tokio::sync::Mutex<()>>,
    token: CancellationToken,
    mut rx: mpsc::Receiver<OwnedMessage>,
) {
    let _turn = turn.lock_owned().await;
    let mut batch = Vec::new();
    loop {
        let message = tokio::select! {
            biased;
            () = token.cancelled() => break,
            message = rx.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        batch.clear();
        batch.push(message);
        if A::BATCHES {
            // Take what is already queued, without waiting for more: batching adds no
            // latency, it only catches up faster when the partition is behind.
            while batch.len() < shared.config.max_batch {
                match rx.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
        }
        if batch.len() > 1 && shared.process_batch(&batch).await {
            if let Some(last) = batch.last() {
                shared.store_offset(last);
            }
            continue;
        }
        // One at a time: the batch had an undecodable message or a failing event, which
        // must be found, retried and maybe dead-lettered on its own. Events of the batch
        // that were applied already are skipped by the projection's checkpoint.
        for message in &batch {
            if token.is_cancelled() {
                return;
            }
            match shared.process(message, &token).await {
                // The guarantee: the offset is stored only now, after the handler
                // succeeded (or the message was dead-lettered).
                Outcome::Done => shared.store_offset(message),
                Outcome::Interrupted => return,
            }
        }
    }
}

impl<E: Event, A: Apply<E>> Shared<E, A> {
    /// Stores the offset after `message`. Fails when the partition was revoked
    /// meanwhile; its next owner gets the message again.
    fn store_offset(&self, message: &OwnedMessage) {
        if let Err(err) =
            self.consumer
                .store_offset(message.topic(), message.partition(), message.offset())
        {
            debug!(topic = message.topic(), partition = message.partition(), error = %err, "offset not stored (partition revoked)");
        }
    }

    /// Applies a batch in one go. `false` when any message cannot be decoded or the
    /// batch fails; the caller then goes one message at a time.
    async fn process_batch(&self, batch: &[OwnedMessage]) -> bool {
        let Ok(envelopes) = batch
            .iter()
            .map(decode_message::<E, _>)
            .collect::<Result<Vec<_>, _>>()
        else {
            return false;
        };
        match AssertUnwindSafe(self.apply.apply_batch(&envelopes))
            .catch_unwind()
            .await
        {
            Ok(Ok(skipped)) => {
                self.stats
                    .handled
                    .fetch_add(envelopes.len() as u64 - skipped, Ordering::Relaxed);
                self.stats.duplicates.fetch_add(skipped, Ordering::Relaxed);
                true
            }
            Ok(Err(err)) => {
                debug!(group = self.config.group_id, error = %error_chain(&err), "batch failed; handling its messages one by one");
                false
            }
            Err(_panic) => false,
        }
    }

    async fn process(&self, message: &OwnedMessage, token: &CancellationToken) -> Outcome {
        let envelope = match decode_message::<E, _>(message) {
            Ok(envelope) => envelope,
            Err(err) => {
                error!(
                    group = self.config.group_id,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    error = %error_chain(&err),
                    "cannot decode message; sending it to the dead-letter topic"
                );
                return self
                    .dead_letter(message, &err, DeadLetterReason::Decode, 0, token)
                    .await;
            }
        };
        let mut attempts = 0;
        let mut outages = 0;
        loop {
            let result = AssertUnwindSafe(self.apply.apply(&envelope))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".to_owned());
                    Err(Error::handler(
                        self.config.group_id.clone(),
                        format!("handler panicked: {text}"),
                    ))
                });
            let err = match result {
                Ok(skipped) => {
                    if skipped > 0 {
                        self.stats.duplicates.fetch_add(skipped, Ordering::Relaxed);
                        debug!(
                            group = self.config.group_id,
                            aggregate_id = envelope.aggregate_id,
                            sequence = envelope.sequence,
                            "already applied; skipped"
                        );
                    } else {
                        self.stats.handled.fetch_add(1, Ordering::Relaxed);
                    }
                    return Outcome::Done;
                }
                Err(err) => err,
            };
            let delay = if is_outage(&err) {
                outages += 1;
                let delay = self.config.retry.backoff(outages);
                warn!(
                    group = self.config.group_id,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    aggregate_id = envelope.aggregate_id,
                    sequence = envelope.sequence,
                    error = %error_chain(&err),
                    retry_in_ms = delay.as_millis() as u64,
                    "infrastructure error; retrying until it recovers"
                );
                delay
            } else {
                outages = 0;
                attempts += 1;
                if attempts >= self.config.retry.max_attempts {
                    error!(
                        group = self.config.group_id,
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        aggregate_id = envelope.aggregate_id,
                        sequence = envelope.sequence,
                        attempts,
                        error = %error_chain(&err),
                        "handler keeps failing; sending the message to the dead-letter topic"
                    );
                    return self
                        .dead_letter(message, &err, DeadLetterReason::Handler, attempts, token)
                        .await;
                }
                let delay = self.config.retry.backoff(attempts);
                warn!(
                    group = self.config.group_id,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    aggregate_id = envelope.aggregate_id,
                    sequence = envelope.sequence,
                    attempt = attempts,
                    error = %error_chain(&err),
                    retry_in_ms = delay.as_millis() as u64,
                    "handler failed; retrying"
                );
                delay
            };
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            if !sleep_or_cancel(delay, token).await {
                return Outcome::Interrupted;
            }
        }
    }

    /// Writes `message` to the dead-letter topic with the reason in its headers, retrying
    /// until the broker accepts it: the offset must not move past a message that is
    /// neither handled nor dead-lettered.
    async fn dead_letter(
        &self,
        message: &OwnedMessage,
        err: &Error,
        reason: DeadLetterReason,
        attempts: u32,
        token: &CancellationToken,
    ) -> Outcome {
        let topic = self.config.dead_letter_topic(message.topic());
        let error_text = error_chain(err);
        let original = header_pairs(message);
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let attempts_text = attempts.to_string();
        let mut failures = 0;
        loop {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let mut headers = OwnedHeaders::new_with_capacity(original.len() + 8);
            for (key, value) in &original {
                headers = headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            for (key, value) in [
                (header::DLQ_ERROR, error_text.as_str()),
                (header::DLQ_REASON, reason.as_str()),
                (header::DLQ_ATTEMPTS, &attempts_text),
                (header::DLQ_TOPIC, message.topic()),
                (header::DLQ_PARTITION, &partition),
                (header::DLQ_OFFSET, &offset),
                (header::DLQ_GROUP, &self.config.group_id),
                (header::DLQ_TIME, &now),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&topic).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self
                .dlq_producer
                .send(record, Timeout::After(Duration::from_secs(5)))
                .await
            {
                Ok(delivery) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        group = self.config.group_id,
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        dead_letter_topic = topic,
                        dead_letter_partition = delivery.partition,
                        dead_letter_offset = delivery.offset,
                        reason = reason.as_str(),
                        "message dead-lettered; moving on"
                    );
                    return Outcome::Done;
                }
                Err((send_err, _)) => {
                    failures += 1;
                    let delay = self.config.retry.backoff(failures);
                    warn!(dead_letter_topic = topic, error = %send_err, retry_in_ms = delay.as_millis() as u64, "cannot write to the dead-letter topic; retrying");
                    if !sleep_or_cancel(delay, token).await {
                        return Outcome::Interrupted;
                    }
                }
            }
        }
    }
}

/// Consumer callbacks: tracks which partitions have a worker, so a revocation can stop
/// them, and commits on revocation so the next owner starts where this one stopped.
struct GroupContext {
    group_id: String,
    partitions: Mutex<HashMap<(String, i32), CancellationToken>>,
    commit_on_revoke: AtomicBool,
}

impl GroupContext {
    fn lock_partitions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, i32), CancellationToken>> {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let revoked: Vec<(String, i32)> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                info!(group = self.group_id, partitions = ?revoked, "partitions revoked");
                {
                    // Workers of revoked partitions drop their queued messages and stop
                    // after the message in hand.
                    let mut partitions = self.lock_partitions();
                    for key in &revoked {
                        if let Some(token) = partitions.remove(key) {
                            token.cancel();
                        }
                    }
                }
                // Commit what was handled, so the next owner does not redo it. (The
                // message in hand is not stored yet: its next owner handles it again.)
                if self.commit_on_revoke.load(Ordering::SeqCst) {
                    match consumer.commit_consumer_state(CommitMode::Sync) {
                        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                        Err(err) => {
                            warn!(group = self.group_id, error = %err, "commit on revocation failed")
                        }
                    }
                }
            }
            Rebalance::Assign(list) => {
                let assigned: Vec<(String, i32)> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                info!(group = self.group_id, partitions = ?assigned, "partitions assigned");
            }
            Rebalance::Error(err) => warn!(group = self.group_id, error = %err, "rebalance error"),
        }
    }
}

/// Disarms the commit-on-revoke when `run` is dropped before its graceful shutdown.
struct AbandonGuard {
    consumer: Option<Arc<StreamConsumer<GroupContext>>>,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer
                .context()
                .commit_on_revoke
                .store(false, Ordering::SeqCst);
        }
    }
}
