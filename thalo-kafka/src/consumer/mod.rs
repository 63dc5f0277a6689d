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
//!
//! # Nothing is skipped: sequenced dead letters
//!
//! When a handler gives up on event `n` of an aggregate (it keeps failing, or the event
//! cannot be decoded), the consumer *parks* the aggregate's stream: event `n` and every
//! later event of that aggregate are held, never handled past the hole, while other
//! aggregates keep flowing. A sequence gap (event `n + 1` arrives and `n` never did)
//! parks the stream too, with an error naming the missing sequence. Parked and held
//! messages are still written to the dead-letter topic, as the record. Projections run
//! with [`KafkaConsumer::run_projection`] park in Postgres, next to their checkpoints,
//! and `thalo_postgres::PgEventStore::redrive_projection` applies the stream from the
//! store, in order and exactly once, when the cause is fixed. Plain handlers park in
//! memory, or durably with `KafkaConsumer::with_store` (re-driven with
//! `thalo_postgres::PgEventStore::redrive_handler`).
//!
//! # One publisher: fencing
//!
//! Every message the relay publishes carries its leader's epoch and the event's
//! sequence. A worker drops a message from an older epoch than one it has seen for the
//! same aggregate (a deposed relay's late publish), and a message whose sequence it has
//! seen (a relay duplicate), so a handler never sees an aggregate's sequence go
//! backwards.
//!
//! # Slow partitions and crashed members
//!
//! Each partition has a bounded queue. When one is full, the consumer pauses that
//! partition (rdkafka `pause`) and resumes it when the queue drains, so a slow
//! partition never stops the others, and the poll loop keeps serving rebalances and
//! commits. A member that crashes keeps its partitions until the broker expires its
//! session; with [`KafkaConsumer::with_instance_id`] (static membership) a restarted
//! member takes its partitions back as soon as it rejoins.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use thalo::{
    AggregateType, Error, Event, EventEnvelope, EventHandler, EventSet, RawEvent, Shutdown,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::sleep_or_cancel;
use crate::message::error_chain;
use crate::topic::{ensure_topics_with, TopicNaming, TopicSettings};
use crate::RetryPolicy;

mod dead_letter;
mod handle;
mod instruments;
mod offsets;
mod rebalance;
mod worker;

use handle::StatsCounters;
pub use handle::{ConsumerHandle, PartitionProgress};

use handle::RunningGuard;
use instruments::ConsumerMetrics;
use offsets::{Continuity, Verdict};
use rebalance::{AbandonGuard, GroupContext};
use worker::partition_worker;

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
/// - **Sequenced dead letters**: a message that cannot be decoded (not JSON, unknown
///   event type) or whose handler keeps failing parks its aggregate's stream: its later
///   events are held, not handled past it, until a re-drive (see the
///   [module docs](self)); a sequence gap parks the stream too. Every message not
///   handled is written to the dead-letter topic (`<topic>.dlq` by default) with its
///   key, value and headers, plus headers that say why
///   ([`header::DLQ_ERROR`](crate::message::header::DLQ_ERROR), `thalo_dlq_reason`:
///   `decode`, `handler`, `gap` or `held`). Then the consumer goes on with the other
///   aggregates.
/// - **Shutdown**: when the token is cancelled, the message in hand is finished, the
///   offsets are committed, and the consumer leaves the group. If instead the future
///   is dropped (the task is aborted), nothing more is committed, as after a crash.
///
/// ```no_run
/// # async fn example() -> Result<(), thalo::Error> {
/// use thalo::{Error, Event, EventEnvelope, EventHandler, RawEvent};
/// use thalo_kafka::{KafkaConsumer, RetryPolicy};
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
///     .run(Mailer, thalo::Shutdown::on_signal())
///     .await?;
/// println!("handled {} events", stats.handled);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct KafkaConsumer {
    brokers: String,
    // `pub(crate)`: `run_projection` (projection.rs) derives the group of a projection.
    pub(crate) group_id: String,
    /// Put in front of a projection's derived group id (see projection.rs).
    pub(crate) group_prefix: String,
    topics: Vec<TopicSource>,
    naming: TopicNaming,
    topic_settings: TopicSettings,
    retry: RetryPolicy,
    dead_letter: DeadLetterNaming,
    commit_interval: Duration,
    queue_capacity: usize,
    max_batch: usize,
    client_config: Vec<(String, String)>,
    instance_id: Option<String>,
    #[cfg(feature = "postgres")]
    store: Option<thalo_postgres::PgEventStore>,
    handle: ConsumerHandle,
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
#[non_exhaustive]
pub struct ConsumerStats {
    /// Messages handled successfully.
    pub handled: u64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Events skipped because they were applied already (redeliveries, relay
    /// duplicates, a deposed relay leader's late messages).
    pub duplicates: u64,
    /// Streams parked (a handler gave up on an event, or a sequence was missing).
    pub parked: u64,
    /// Events held behind a parked event of their aggregate.
    pub held: u64,
}

impl KafkaConsumer {
    /// A consumer in group `group_id` with the brokers, every property and the topic
    /// naming of `config` (the properties reach the consumer, its dead-letter producer
    /// and its admin client). Build the relay from the same
    /// [`KafkaConfig`](crate::KafkaConfig). For a projection, use
    /// [`for_projection_from_kafka_config`](KafkaConsumer::for_projection_from_kafka_config):
    /// a projection's group is derived from its name and version.
    pub fn from_kafka_config(config: &crate::KafkaConfig, group_id: impl Into<String>) -> Self {
        let mut consumer =
            Self::new(config.brokers(), group_id).with_topic_naming(config.topic_naming().clone());
        consumer.group_prefix = config.group_prefix().to_owned();
        for (key, value) in config.properties() {
            consumer = consumer.set(key, value);
        }
        consumer
    }

    /// A consumer in group `group_id` of the cluster at `brokers`. Add topics with
    /// [`subscribe`](KafkaConsumer::subscribe) or [`with_topic`](KafkaConsumer::with_topic).
    ///
    /// A new group starts at the beginning of each topic (`auto.offset.reset=earliest`),
    /// so a new projection sees every event still in Kafka. For a projection, use
    /// [`for_projection`](KafkaConsumer::for_projection): a projection's group is derived
    /// from its name and version, and [`run_projection`](KafkaConsumer::run_projection)
    /// uses that one.
    pub fn new(brokers: impl Into<String>, group_id: impl Into<String>) -> Self {
        KafkaConsumer {
            brokers: brokers.into(),
            group_id: group_id.into(),
            group_prefix: String::new(),
            topics: Vec::new(),
            naming: TopicNaming::default(),
            topic_settings: TopicSettings::default(),
            retry: RetryPolicy::default(),
            dead_letter: DeadLetterNaming::Suffix(".dlq".to_owned()),
            commit_interval: Duration::from_secs(1),
            queue_capacity: 1000,
            max_batch: 200,
            client_config: Vec::new(),
            instance_id: None,
            #[cfg(feature = "postgres")]
            store: None,
            handle: ConsumerHandle::default(),
        }
    }

    /// A view of this consumer's state for readiness checks (running, joined, assigned
    /// partitions); see [`ConsumerHandle`]. Take it before `run`, which consumes the
    /// consumer. Clones of a consumer share their handle.
    pub fn handle(&self) -> ConsumerHandle {
        self.handle.clone()
    }

    /// Static group membership (`group.instance.id`): a stable name for this member,
    /// unique within the group and the same across restarts (e.g. the host or pod
    /// name). A member that crashed and restarts under the same id takes its partitions
    /// back as soon as it rejoins, without waiting for the broker to expire the dead
    /// session and without a rebalance of the other members. Without it, a SIGKILLed
    /// member keeps its partitions until its session times out (`session.timeout.ms`,
    /// 45 s by default), and on some brokers (tansu 0.6) forever.
    #[must_use]
    pub fn with_instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// Parks the streams of a plain [`EventHandler`] durably in `store`'s database
    /// (table `consumer_parked`, under the group id), so a restart keeps them parked
    /// and `thalo_postgres::PgEventStore::redrive_handler` can re-drive them. Without a
    /// store, a handler's parked streams live in memory (and in the dead-letter topic's
    /// record) until the consumer stops. Projections always park in their own store.
    #[cfg(feature = "postgres")]
    #[must_use]
    pub fn with_store(mut self, store: thalo_postgres::PgEventStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Subscribes to the topic of aggregate `A` (named by the
    /// [topic naming](KafkaConsumer::with_topic_naming), as the relay names it).
    #[must_use]
    pub fn subscribe<A: AggregateType>(mut self) -> Self {
        self.topics.push(TopicSource::Aggregate(A::TYPE));
        self
    }

    /// Subscribes to the topics of every aggregate type of the event set `M` (see
    /// [`thalo::event_set!`]), for a handler or projection of `M`: a multi-stream
    /// projection fed from Kafka.
    ///
    /// Each message is decoded into `M` by its aggregate-type header
    /// ([`Event::decode_from`]), so event type names may
    /// repeat across the set's aggregates. Order holds per aggregate (all of an
    /// aggregate's events share a partition of its type's topic), not across
    /// aggregates or topics: a view that needs the store's global order across
    /// aggregates runs in process (`thalo_postgres::PgSubscription::new_set`).
    /// [`run_projection`](KafkaConsumer::run_projection) gives exactly-once effects as
    /// with one aggregate type: per-stream checkpoints, whatever the stream's type. A
    /// message of an aggregate type outside the set (a topic shared with other types)
    /// cannot be decoded, and is parked and dead-lettered like any undecodable message.
    ///
    /// ```no_run
    /// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
    /// # pub struct Account { #[identity] id: String }
    /// # #[thalo::commands] impl Account {
    /// #     pub fn open(&self, owner: String) -> Result<OpenedEvent, Error> { Ok(OpenedEvent { owner }) }
    /// # }
    /// # #[thalo::events] impl Account { pub fn opened(&mut self, owner: String) { let _ = owner; } }
    /// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
    /// # pub struct Card { #[identity] id: String }
    /// # #[thalo::commands] impl Card {
    /// #     pub fn issue(&self, owner: String) -> Result<IssuedEvent, Error> { Ok(IssuedEvent { owner }) }
    /// # }
    /// # #[thalo::events] impl Card { pub fn issued(&mut self, owner: String) { let _ = owner; } }
    /// use thalo::{Error, EventEnvelope, EventHandler};
    /// use thalo_kafka::KafkaConsumer;
    ///
    /// thalo::event_set! {
    ///     /// What the welcome mailer reads.
    ///     pub enum OwnerEvent {
    ///         Account(Account),
    ///         Card(Card),
    ///     }
    /// }
    ///
    /// struct Welcome;
    ///
    /// impl EventHandler<OwnerEvent> for Welcome {
    ///     async fn handle(&self, envelope: &EventEnvelope<OwnerEvent>) -> Result<(), Error> {
    ///         match &envelope.event {
    ///             OwnerEvent::Account(AccountEvent::Opened(e)) => println!("welcome, {}", e.owner),
    ///             OwnerEvent::Card(CardEvent::Issued(e)) => println!("your card, {}", e.owner),
    ///         }
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # async fn example() -> Result<(), Error> {
    /// // Topics `account` and `card` (with the default topic naming).
    /// KafkaConsumer::new("127.0.0.1:9092", "welcome")
    ///     .subscribe_set::<OwnerEvent>()
    ///     .run(Welcome, thalo::Shutdown::on_signal())
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`thalo::AnyEvent`] (every aggregate type) names no aggregate type, so it adds no
    /// topic: name the topics with [`with_topic`](KafkaConsumer::with_topic).
    #[must_use]
    pub fn subscribe_set<M: EventSet>(mut self) -> Self {
        self.topics.extend(
            M::aggregate_types()
                .iter()
                .map(|aggregate_type| TopicSource::Aggregate(aggregate_type)),
        );
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

    /// How many received messages may wait per partition (default 1000). A partition
    /// whose handler takes nothing from its queue for half a second, or that falls eight
    /// queues' worth behind, is paused (it alone) until it drains; the consumer keeps
    /// polling the others.
    #[must_use]
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Most messages a Postgres projection applies in one transaction (default 200).
    /// Only messages that are already waiting are batched, so this never adds latency.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.max_batch = batch_size.max(1);
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

    /// The topics this consumer subscribes to, each once (a custom
    /// [topic naming](KafkaConsumer::with_topic_naming) may put several aggregate types
    /// in one topic).
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = Vec::with_capacity(self.topics.len());
        for source in &self.topics {
            let topic = match source {
                TopicSource::Topic(topic) => topic.clone(),
                TopicSource::Aggregate(aggregate_type) => self.naming.topic(aggregate_type),
            };
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        topics
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
        shutdown: impl Into<Shutdown>,
    ) -> Result<ConsumerStats, Error>
    where
        E: Event,
        H: EventHandler<E> + 'static,
    {
        let apply = HandlerApply {
            handler,
            #[cfg(feature = "postgres")]
            store: self.store.clone(),
            _event: PhantomData,
        };
        self.run_with(apply, shutdown.into().into_token()).await
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
        let admin_config = self.admin_config();
        loop {
            // Raced with shutdown: against an unreachable broker the request takes its
            // whole timeout (10 s), which a shutdown should not wait for.
            let ensured = tokio::select! {
                ensured = ensure_topics_with(
                    &self.brokers,
                    &admin_config,
                    &needed,
                    &self.topic_settings,
                ) => ensured,
                () = shutdown.cancelled() => return Ok(ConsumerStats::default()),
            };
            match ensured {
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

        let context = GroupContext::new(self.group_id.clone(), self.handle.clone());
        let consumer: StreamConsumer<GroupContext> = self
            .consumer_config()
            .create_with_context(context)
            .map_err(|e| Error::broker("creating the Kafka consumer", e))?;
        let consumer = Arc::new(consumer);
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topic_refs)
            .map_err(|e| Error::broker("subscribing", e))?;
        let dlq_producer: FutureProducer = self
            .admin_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| Error::broker("creating the dead-letter producer", e))?;
        info!(group = self.group_id, ?topics, "consumer started");
        // Not running any more when this function returns or its future is dropped.
        self.handle.started();
        let _running = RunningGuard(self.handle.clone());

        let stats = self.handle.new_run();
        let shared = Arc::new(Shared {
            consumer: Arc::clone(&consumer),
            apply,
            dlq_producer,
            metrics: ConsumerMetrics::new(&self.group_id),
            config: self,
            stats,
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
        // The next offset of each partition, so that a broker that skips offsets is
        // caught (see `offsets.rs`).
        let mut continuity = Continuity::default();
        // Messages of partitions whose worker's queue was full, in order; since when each
        // worker has taken nothing from its queue; the partitions paused.
        let mut overflow: HashMap<(String, i32), VecDeque<OwnedMessage>> = HashMap::new();
        let mut stuck_since: HashMap<(String, i32), std::time::Instant> = HashMap::new();
        let mut paused: HashSet<(String, i32)> = HashSet::new();
        let mut stall_tick = tokio::time::interval(offsets::STALL / 2);
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_tick = tokio::time::interval(Duration::from_millis(10));
        drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Re-drives an operator asked for, one round at a time, beside the workers.
        let mut redrive_tick = tokio::time::interval(REDRIVE_POLL);
        redrive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redriving: Option<tokio::task::JoinHandle<()>> = None;

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
                _ = stall_tick.tick() => {
                    continuity.retain(|key| workers.get(key).is_some_and(|w| !w.token.is_cancelled() && !w.tx.is_closed()));
                    let now = tokio::time::Instant::now().into_std();
                    for key in continuity.keys() {
                        if paused.contains(&key) {
                            continue; // paused on purpose
                        }
                        let Some(high) = consumer.context().high_watermark(&key) else { continue };
                        if let Some(from) = continuity.stalled(&key, high, now) {
                            debug!(group = shared.config.group_id, topic = key.0, partition = key.1, high, refetch_from = from, "a partition with messages left delivers nothing (the broker skipped offsets?); fetching again from further back");
                            if let Err(err) = consumer.seek(&key.0, key.1, Offset::Offset(from), Timeout::After(Duration::ZERO)) {
                                warn!(group = shared.config.group_id, topic = key.0, partition = key.1, error = %err, "cannot seek to fetch skipped offsets again");
                            }
                        }
                    }
                }
                _ = redrive_tick.tick() => {
                    if redriving.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                        let shared = Arc::clone(&shared);
                        redriving = Some(tokio::spawn(async move {
                            if let Err(err) = shared.apply.redrive_requested(&shared.config.group_id).await {
                                debug!(group = shared.config.group_id, error = %error_chain(&err), "cannot run requested re-drives");
                            }
                        }));
                    }
                }
                _ = drain_tick.tick(), if !overflow.is_empty() => {
                    drain(&consumer, &workers, &mut overflow, &mut stuck_since, &mut paused, &shared.config);
                }
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
                        // First message of a newly assigned partition. Messages kept from
                        // an earlier assignment of it were never handled: the new
                        // assignment fetches them again from the committed offset.
                        overflow.remove(&key);
                        stuck_since.remove(&key);
                        if paused.remove(&key) {
                            resume(&consumer, &key, &shared.config.group_id);
                        }
                        continuity.start(key.clone(), committed_offset(&consumer, &key).await);
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
                    match continuity.check(&key, message.offset()) {
                        Verdict::Deliver => {}
                        Verdict::Drop => continue,
                        Verdict::Refetch { from } => {
                            debug!(
                                group = shared.config.group_id,
                                topic = key.0,
                                partition = key.1,
                                offset = message.offset(),
                                refetch_from = from,
                                "the broker skipped offsets (a fetch from the middle of a record batch); fetching again from further back"
                            );
                            if let Err(err) = consumer.seek(&key.0, key.1, Offset::Offset(from), Timeout::After(Duration::ZERO)) {
                                warn!(group = shared.config.group_id, topic = key.0, partition = key.1, error = %err, "cannot seek to fetch skipped offsets again");
                            }
                            continue;
                        }
                    }
                    if let Some(queue) = overflow.get_mut(&key) {
                        // Behind: keep the order. Far behind, pause the partition
                        // (backpressure for it alone) and keep polling, so the other
                        // partitions, rebalances and commits go on.
                        queue.push_back(message);
                        if queue.len() >= OVERFLOW_FACTOR * shared.config.queue_capacity
                            && paused.insert(key.clone())
                        {
                            pause(&consumer, &key, &shared.config.group_id);
                        }
                        continue;
                    }
                    let Some(worker) = workers.get(&key) else { continue };
                    match worker.tx.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(message)) => {
                            stuck_since.entry(key.clone()).or_insert_with(std::time::Instant::now);
                            overflow.entry(key).or_default().push_back(message);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            // The partition was revoked meanwhile; its new owner (maybe
                            // us again) starts from the committed offset.
                            debug!(topic = key.0, partition = key.1, "dropped a message of a revoked partition");
                        }
                    }
                }
            }
        }

        // A re-drive in progress rolls back (its transaction never commits) and is asked
        // for again on the next start: the request stays until it succeeds or fails.
        if let Some(redrive) = redriving {
            redrive.abort();
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
            .set("enable.partition.eof", "false")
            // High watermarks for the stall check (see `offsets.rs`).
            .set("statistics.interval.ms", "1000");
        if let Some(instance_id) = &self.instance_id {
            config.set("group.instance.id", instance_id);
        }
        for (key, value) in &self.client_config {
            config.set(key, value);
        }
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        config
    }

    /// The connection settings for the admin client and the dead-letter producer: the
    /// brokers and the user's properties that are not consumer-only (security settings
    /// in particular must reach every client).
    fn admin_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.client_config {
            if !is_consumer_only(key) {
                config.set(key, value);
            }
        }
        config
    }
}

/// Consumer properties a producer or admin client does not know.
fn is_consumer_only(key: &str) -> bool {
    key.starts_with("group.")
        || key.starts_with("auto.")
        || key.starts_with("fetch.")
        || key.starts_with("enable.auto.")
        || matches!(
            key,
            "session.timeout.ms"
                | "heartbeat.interval.ms"
                | "max.poll.interval.ms"
                | "partition.assignment.strategy"
                | "enable.partition.eof"
                | "isolation.level"
                | "queued.min.messages"
                | "queued.max.messages.kbytes"
                | "check.crcs"
        )
}

/// The group's committed offset of a partition, if there is one.
async fn committed_offset(
    consumer: &Arc<StreamConsumer<GroupContext>>,
    key: &(String, i32),
) -> Option<i64> {
    let consumer = Arc::clone(consumer);
    let list = partition_list(key);
    let key = key.clone();
    tokio::task::spawn_blocking(move || {
        let committed = consumer
            .committed_offsets(list, Timeout::After(Duration::from_secs(5)))
            .ok()?;
        match committed.find_partition(&key.0, key.1)?.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        }
    })
    .await
    .ok()
    .flatten()
}

fn partition_list(key: &(String, i32)) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(&key.0, key.1);
    list
}

fn pause(consumer: &StreamConsumer<GroupContext>, key: &(String, i32), group: &str) {
    match consumer.pause(&partition_list(key)) {
        Ok(()) => debug!(
            group,
            topic = key.0,
            partition = key.1,
            "partition paused: its handler is behind"
        ),
        Err(err) => {
            warn!(group, topic = key.0, partition = key.1, error = %err, "cannot pause a partition")
        }
    }
}

fn resume(consumer: &StreamConsumer<GroupContext>, key: &(String, i32), group: &str) {
    match consumer.resume(&partition_list(key)) {
        Ok(()) => debug!(group, topic = key.0, partition = key.1, "partition resumed"),
        // Revoked meanwhile: nothing to resume.
        Err(err) => {
            debug!(group, topic = key.0, partition = key.1, error = %err, "cannot resume a partition")
        }
    }
}

/// A partition falls behind by up to this many queues' worth before it is paused.
const OVERFLOW_FACTOR: usize = 8;

/// A partition whose worker takes nothing from its queue for this long is paused.
const STUCK: Duration = Duration::from_millis(500);

/// How often a consumer looks for re-drives an operator requested.
const REDRIVE_POLL: Duration = Duration::from_secs(1);

/// Moves the messages of partitions that fell behind into their workers' queues as room
/// frees up, resumes a paused partition once all of its messages are queued, and pauses
/// a partition whose worker is stuck.
///
/// A partition whose handler is merely slower than the fetch is not paused until it is
/// [`OVERFLOW_FACTOR`] queues behind, which keeps resumes rare: a resume costs a fetch,
/// and on a broker that cannot fetch from the middle of a record batch a re-fetch of
/// that batch (see `offsets.rs`).
fn drain(
    consumer: &StreamConsumer<GroupContext>,
    workers: &HashMap<(String, i32), Worker>,
    overflow: &mut HashMap<(String, i32), VecDeque<OwnedMessage>>,
    stuck_since: &mut HashMap<(String, i32), std::time::Instant>,
    paused: &mut HashSet<(String, i32)>,
    config: &KafkaConsumer,
) {
    let group = config.group_id.as_str();
    overflow.retain(|key, queue| {
        let Some(worker) = workers
            .get(key)
            .filter(|w| !w.token.is_cancelled() && !w.tx.is_closed())
        else {
            // Revoked: the next owner fetches these again from the committed offset.
            paused.remove(key);
            stuck_since.remove(key);
            return false;
        };
        let mut moved = false;
        while let Some(message) = queue.pop_front() {
            match worker.tx.try_send(message) {
                Ok(()) => moved = true,
                Err(mpsc::error::TrySendError::Full(message)) => {
                    queue.push_front(message);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    paused.remove(key);
                    stuck_since.remove(key);
                    return false;
                }
            }
        }
        if queue.is_empty() {
            stuck_since.remove(key);
            if paused.remove(key) {
                resume(consumer, key, group);
            }
            return false;
        }
        let now = std::time::Instant::now();
        if moved {
            stuck_since.insert(key.clone(), now);
        }
        let stuck = stuck_since
            .get(key)
            .is_some_and(|since| now.duration_since(*since) >= STUCK);
        if stuck && paused.insert(key.clone()) {
            pause(consumer, key, group);
        }
        true
    });
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

/// How many events of an [`Apply`] call were not applied, and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Already applied (duplicates and redeliveries).
    pub(crate) duplicates: u64,
    /// Held behind a parked event of their stream.
    pub(crate) held: u64,
}

/// What the consumer does with decoded events: call a handler, or apply a projection.
pub(crate) trait Apply<E: Event>: Send + Sync + 'static {
    /// Whether [`apply_batch`](Apply::apply_batch) is worth using: then a worker hands
    /// over everything its partition has queued at once.
    const BATCHES: bool = false;

    /// Whether `apply` itself holds the events of parked streams and parks on gaps
    /// (exactly-once projections, whose parking lives with their checkpoints).
    const PARKS_IN_STORE: bool = false;

    /// Applies one event.
    fn apply(
        &self,
        envelope: &EventEnvelope<E>,
    ) -> impl Future<Output = Result<Counts, Error>> + Send;

    /// Applies events of one partition, in order, all or nothing.
    fn apply_batch(
        &self,
        envelopes: &[EventEnvelope<E>],
    ) -> impl Future<Output = Result<Counts, Error>> + Send {
        async move {
            let mut counts = Counts::default();
            for envelope in envelopes {
                let one = self.apply(envelope).await?;
                counts.duplicates += one.duplicates;
                counts.held += one.held;
            }
            Ok(counts)
        }
    }

    /// Parks `raw`'s stream at `sequence` for the consumer `group`. `Ok(true)` when the
    /// park is durable (in a store), `Ok(false)` when the worker keeps it in memory.
    fn park(
        &self,
        group: &str,
        raw: &EventEnvelope<RawEvent>,
        sequence: u64,
        error: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = (group, raw, sequence, error);
        async { Ok(false) }
    }

    /// Whether a durably parked stream is still parked (an operator may have re-driven
    /// it). Waits while a re-drive of the stream is in progress.
    fn still_parked(
        &self,
        group: &str,
        stream: &(String, String),
    ) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = (group, stream);
        async { Ok(true) }
    }

    /// Re-drives the parked streams an operator asked to re-drive (`thalo dlq
    /// redrive`, `PgEventStore::request_redrive`), with this consumer's own code, and
    /// returns how many it re-drove. A failed re-drive withdraws its request (the
    /// stream stays parked; the error is in `parking_log`).
    fn redrive_requested(&self, group: &str) -> impl Future<Output = Result<usize, Error>> + Send {
        let _ = group;
        async { Ok(0) }
    }
}

/// Runs the requested re-drives of `consumer` with `redrive`, withdrawing the requests
/// that fail; how many succeeded.
#[cfg(feature = "postgres")]
pub(crate) async fn redrive_requested_with<F, Fut>(
    store: &thalo_postgres::PgEventStore,
    consumer: &str,
    mut redrive: F,
) -> Result<usize, Error>
where
    F: FnMut(String, String) -> Fut,
    Fut: Future<Output = Result<Option<thalo_postgres::Redriven>, Error>>,
{
    let mut done = 0;
    for (aggregate_type, aggregate_id) in store.redrive_requests(consumer).await? {
        match redrive(aggregate_type.clone(), aggregate_id.clone()).await {
            Ok(redriven) => {
                done += 1;
                info!(
                    consumer,
                    aggregate_type,
                    aggregate_id,
                    applied = redriven.map_or(0, |r| r.applied),
                    "re-drove a parked stream on request"
                );
            }
            Err(err) => {
                let error = error_chain(&err);
                warn!(
                    consumer,
                    aggregate_type,
                    aggregate_id,
                    error,
                    "a requested re-drive failed; the stream stays parked"
                );
                store
                    .fail_redrive_request(consumer, &aggregate_type, &aggregate_id, &error)
                    .await?;
            }
        }
    }
    Ok(done)
}

struct HandlerApply<H, E> {
    handler: H,
    #[cfg(feature = "postgres")]
    store: Option<thalo_postgres::PgEventStore>,
    _event: PhantomData<fn(E)>,
}

impl<E: Event, H: EventHandler<E> + 'static> Apply<E> for HandlerApply<H, E> {
    async fn apply(&self, envelope: &EventEnvelope<E>) -> Result<Counts, Error> {
        self.handler
            .handle(envelope)
            .await
            .map(|()| Counts::default())
    }

    #[cfg(feature = "postgres")]
    async fn park(
        &self,
        group: &str,
        raw: &EventEnvelope<RawEvent>,
        sequence: u64,
        error: &str,
    ) -> Result<bool, Error> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        store
            .park_stream(
                group,
                &raw.aggregate_type,
                &raw.aggregate_id,
                sequence,
                error,
            )
            .await?;
        Ok(true)
    }

    #[cfg(feature = "postgres")]
    async fn still_parked(&self, group: &str, stream: &(String, String)) -> Result<bool, Error> {
        let Some(store) = &self.store else {
            return Ok(true);
        };
        Ok(store
            .parked_stream(group, &stream.0, &stream.1)
            .await?
            .is_some())
    }

    #[cfg(feature = "postgres")]
    async fn redrive_requested(&self, group: &str) -> Result<usize, Error> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        redrive_requested_with(store, group, |aggregate_type, aggregate_id| async move {
            store
                .redrive_handler(group, &self.handler, &aggregate_type, &aggregate_id)
                .await
        })
        .await
    }
}

/// Whether an error is an outage (retried without limit) rather than a problem with the
/// message (retried a few times, then parked).
///
/// With the `postgres` feature, a database error anywhere in the chain decides: lost
/// connections, pool timeouts, server shutdowns, serialization failures and deadlocks
/// are outages; constraint violations and other SQL errors are not. Otherwise
/// [`Error::Store`] and [`Error::Broker`] are outages.
pub(crate) fn is_outage(err: &Error) -> bool {
    #[cfg(feature = "postgres")]
    if let Some(outage) = thalo_postgres::database_outage(err) {
        return outage;
    }
    matches!(err, Error::Store { .. } | Error::Broker { .. })
}

struct Worker {
    tx: mpsc::Sender<OwnedMessage>,
    token: CancellationToken,
}

pub(crate) struct Shared<E, A> {
    consumer: Arc<StreamConsumer<GroupContext>>,
    apply: A,
    dlq_producer: FutureProducer,
    config: KafkaConsumer,
    stats: Arc<StatsCounters>,
    metrics: ConsumerMetrics,
    _event: PhantomData<fn(E)>,
}
