//! Publishing one batch of outbox rows to Kafka, and sorting out what failed.

use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::Header;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use thalo::{Error, EventEnvelope, RawEvent};
use thalo_postgres::OutboxEntry;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::RelayConfig;
use crate::message::{encode_headers, header};
use crate::topic::{create_with, TopicNaming};
use crate::trace::{self, Publish, RelayBatch};

/// An aggregate, as the relay keeps them apart: (aggregate type, aggregate id).
pub(crate) type AggregateKey = (String, String);

/// Why a message was not delivered.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) error: String,
    /// The broker (or the client, checking the broker's limits) refused the message for
    /// good: retrying the same message cannot succeed.
    pub(crate) permanent: bool,
}

impl Failure {
    fn from_kafka(err: &KafkaError) -> Self {
        Failure {
            error: err.to_string(),
            permanent: err.rdkafka_error_code().is_some_and(is_permanent),
        }
    }

    fn other(error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            permanent: false,
        }
    }
}

/// Errors that the same message will meet again however often it is retried: it is too
/// large, malformed, or goes to a topic that is invalid or that the relay may not write.
/// Everything else (timeouts, leader changes, a broker that is down, a fatal producer
/// state that a new producer clears) is retriable.
pub(crate) fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::UnsupportedForMessageFormat
            | RDKafkaErrorCode::InvalidRequiredAcks
    )
}

/// The outcome of publishing one batch.
#[derive(Debug, Default)]
pub(crate) struct BatchOutcome {
    /// Outbox ids that may be deleted.
    pub(crate) delivered: Vec<i64>,
    /// Aggregates with at least one delivered message (and no failure).
    pub(crate) succeeded: HashSet<AggregateKey>,
    /// Per failed aggregate: its first undelivered row and why. Its later rows of the
    /// batch were not deleted either (they are republished after it, in order).
    pub(crate) failed: HashMap<AggregateKey, (OutboxEntry, Failure)>,
    /// Rows kept in the outbox.
    pub(crate) kept: usize,
}

/// The relay's Kafka clients.
pub(crate) struct Kafka {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist.
    topics: HashSet<String>,
    /// Aggregate type -> topic.
    names: HashMap<String, String>,
    /// Topic -> its `thalo_relay_published_total` counter, registered once per topic so
    /// that counting a message costs a lookup, not a label allocation.
    published: HashMap<String, metrics::Counter>,
}

impl Kafka {
    pub(crate) fn new(config: &RelayConfig) -> Result<Self, Error> {
        let mut admin = ClientConfig::new();
        admin.set("bootstrap.servers", &config.brokers);
        for (key, value) in &config.producer_config {
            if !is_producer_only(key) {
                admin.set(key, value);
            }
        }
        let admin = admin
            .create()
            .map_err(|e| Error::broker("creating the Kafka admin client", e))?;
        Ok(Kafka {
            producer: producer(config)?,
            admin,
            topics: HashSet::new(),
            names: HashMap::new(),
            published: HashMap::new(),
        })
    }

    /// After a failed batch: a producer whose idempotence state is broken (a fatal
    /// error: the broker lost the producer id, or the gapless guarantee stopped it)
    /// cannot send again and is replaced. A new producer id starts new sequences;
    /// ordering still holds because the undelivered rows are republished in order.
    pub(crate) fn recover(&mut self, config: &RelayConfig) {
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

    /// Counts a message Kafka acknowledged, under its topic.
    fn count_published(&mut self, topic: &str) {
        if let Some(counter) = self.published.get(topic) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!("thalo_relay_published_total", "topic" => topic.to_owned());
        counter.increment(1);
        self.published.insert(topic.to_owned(), counter);
    }

    fn topic_of(&mut self, naming: &TopicNaming, aggregate_type: &str) -> String {
        self.names
            .entry(aggregate_type.to_owned())
            .or_insert_with(|| naming.topic(aggregate_type))
            .clone()
    }

    /// Publishes `rows` with `epoch` in every message's headers, waits for every
    /// delivery report, and says which rows may be deleted.
    pub(crate) async fn publish(
        &mut self,
        rows: &[OutboxEntry],
        epoch: u64,
        config: &RelayConfig,
        shutdown: &CancellationToken,
    ) -> BatchOutcome {
        let topics: Vec<String> = rows
            .iter()
            .map(|r| self.topic_of(&config.topic_naming, &r.envelope.aggregate_type))
            .collect();
        let mut results: Vec<Option<Result<(), Failure>>> = vec![None; rows.len()];

        // Topics first. A topic that cannot be created fails the rows bound for it, not
        // the others.
        let missing: Vec<String> = topics
            .iter()
            .filter(|t| !self.topics.contains(*t))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut unusable: HashMap<String, Failure> = HashMap::new();
        for topic in missing {
            match create_with(
                &self.admin,
                std::slice::from_ref(&topic),
                &config.topic_settings,
            )
            .await
            {
                Ok(()) => {
                    self.topics.insert(topic);
                }
                Err(err) => {
                    let code = kafka_code(&err);
                    unusable.insert(
                        topic,
                        Failure {
                            error: crate::message::error_chain(&err),
                            permanent: code.is_some_and(is_permanent),
                        },
                    );
                }
            }
        }

        // Enqueue the whole batch before awaiting any delivery report: librdkafka
        // batches the messages per partition and pipelines the requests. Awaiting one
        // send at a time would cost a round trip (and a linger period) per message.
        let epoch_text = epoch.to_string();
        let mut pending: Vec<Pending> = Vec::with_capacity(rows.len());
        let mut batch = RelayBatch::default();
        // Aggregates with a message that could not be enqueued: their later messages
        // are not sent in this batch, or they would overtake it.
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            let aggregate = (topics[i].as_str(), row.envelope.aggregate_id.as_str());
            if blocked.contains(&aggregate) {
                continue;
            }
            if let Some(failure) = unusable.get(&topics[i]) {
                results[i] = Some(Err(failure.clone()));
                blocked.insert(aggregate);
                continue;
            }
            // An event with a trace context gets a `relay_publish` span (when
            // OpenTelemetry records the batch), whose context its message carries.
            let publish = trace::publish_span(&mut batch, &row.envelope, &topics[i], row.id);
            let headers = match &publish {
                Some(publish) => encode_headers(&retraced(&row.envelope, &publish.traceparent)),
                None => encode_headers(&row.envelope),
            }
            .insert(Header {
                key: header::EPOCH,
                value: Some(epoch_text.as_str()),
            });
            let mut record = FutureRecord::to(&topics[i])
                .key(row.envelope.aggregate_id.as_str())
                .payload(row.envelope.event.payload.as_str())
                .headers(headers)
                .timestamp(row.envelope.timestamp.timestamp_millis());
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(Pending {
                            row: i,
                            delivery,
                            publish,
                        });
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The local queue drains as the broker acknowledges.
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((err, _)) => {
                        let failure = Failure::from_kafka(&err);
                        if let Some(publish) = &publish {
                            publish.failed(&failure.error);
                        }
                        results[i] = Some(Err(failure));
                        blocked.insert(aggregate);
                        break;
                    }
                }
            }
        }

        // Wait for every delivery report; each comes within the delivery timeout. On
        // shutdown, give the batch a grace period; rows whose report did not come stay
        // in the outbox.
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
        // duplicates if they did arrive; consumers drop those by sequence). Other
        // aggregates are unaffected: their order is independent.
        //
        // Could a later event of the aggregate have been written while an earlier one
        // failed? Not without a report of it: the idempotent producer numbers each
        // partition's messages, the broker refuses a sequence number that skips one,
        // and with `enable.gapless.guarantee` librdkafka stops the producer (a fatal
        // error, after which it is replaced) rather than renumber around a failed
        // message.
        let mut outcome = BatchOutcome::default();
        for (i, row) in rows.iter().enumerate() {
            let key = (
                row.envelope.aggregate_type.clone(),
                row.envelope.aggregate_id.clone(),
            );
            if outcome.failed.contains_key(&key) {
                outcome.kept += 1;
                continue;
            }
            match results[i].take() {
                Some(Ok(())) => {
                    self.count_published(&topics[i]);
                    outcome.delivered.push(row.id);
                    outcome.succeeded.insert(key);
                }
                Some(Err(failure)) => {
                    outcome.kept += 1;
                    outcome.succeeded.remove(&key);
                    outcome.failed.insert(key, (row.clone(), failure));
                }
                None => {
                    outcome.kept += 1;
                    outcome.succeeded.remove(&key);
                    outcome.failed.insert(
                        key,
                        (
                            row.clone(),
                            Failure::other("no delivery report before shutdown"),
                        ),
                    );
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

/// The librdkafka error code in a [`thalo::Error`]'s chain, if any.
fn kafka_code(err: &Error) -> Option<RDKafkaErrorCode> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(kafka) = e.downcast_ref::<KafkaError>() {
            return kafka.rdkafka_error_code();
        }
        cause = e.source();
    }
    None
}

/// A message handed to the producer: its row in the batch, its delivery report to
/// come, and its `relay_publish` span (closed when the report comes).
struct Pending {
    row: usize,
    delivery: DeliveryFuture,
    publish: Option<Publish>,
}

async fn await_deliveries(pending: Vec<Pending>) -> Vec<(usize, Result<(), Failure>)> {
    let mut reports = Vec::with_capacity(pending.len());
    for Pending {
        row,
        delivery,
        publish,
    } in pending
    {
        let report = match delivery.await {
            Ok(Ok(delivery)) => {
                if let Some(publish) = &publish {
                    publish.delivered(delivery.partition, delivery.offset);
                }
                Ok(())
            }
            Ok(Err((err, _message))) => Err(Failure::from_kafka(&err)),
            Err(_canceled) => Err(Failure::other(
                "the producer was dropped before the delivery report",
            )),
        };
        if let (Some(publish), Err(failure)) = (&publish, &report) {
            publish.failed(&failure.error);
        }
        reports.push((row, report));
    }
    reports
}

/// What the headers of `envelope`'s message are made from when its `relay_publish` span
/// continues the trace: `envelope` with `traceparent` (the span's context) instead of
/// the stored one, and without the payload (the headers do not hold it). The stored
/// event keeps its context.
fn retraced(envelope: &EventEnvelope<RawEvent>, traceparent: &str) -> EventEnvelope<RawEvent> {
    EventEnvelope {
        id: envelope.id,
        aggregate_type: envelope.aggregate_type.clone(),
        aggregate_id: envelope.aggregate_id.clone(),
        sequence: envelope.sequence,
        position: envelope.position,
        timestamp: envelope.timestamp,
        metadata: envelope.metadata.clone().with_traceparent(traceparent),
        event: RawEvent {
            event_type: envelope.event.event_type.clone(),
            version: envelope.event.version,
            payload: String::new(),
        },
    }
}

/// Producer properties an admin client does not know (librdkafka warns about them).
fn is_producer_only(key: &str) -> bool {
    matches!(
        key,
        "linger.ms"
            | "compression.type"
            | "compression.codec"
            | "batch.size"
            | "batch.num.messages"
            | "queue.buffering.max.messages"
            | "queue.buffering.max.kbytes"
            | "message.max.bytes"
            | "delivery.timeout.ms"
            | "message.timeout.ms"
            | "request.required.acks"
            | "acks"
            | "enable.idempotence"
            | "retries"
            | "retry.backoff.ms"
    )
}

/// The relay's producer. The guarantees rest on these settings, so user settings
/// cannot change them:
///
/// - `enable.idempotence=true`: the broker deduplicates retried requests and rejects a
///   request that would leave a gap, so retries neither duplicate nor reorder.
/// - `enable.gapless.guarantee=true`: when a failure could leave a gap in a partition
///   (a message timed out while later ones were in flight), librdkafka stops the
///   producer with a fatal error instead of sending the later ones around it; the relay
///   then replaces the producer and republishes the undelivered rows in order.
/// - `acks=all`: a message counts as delivered only once every in-sync replica has it.
/// - `message.timeout.ms` = the relay's delivery timeout (default 30 s): every message
///   is reported within a bounded time, so a relay whose broker hangs gets back to its
///   loop, finds out whether it still leads the outbox, and stops publishing if not.
fn producer(config: &RelayConfig) -> Result<FutureProducer, Error> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("linger.ms", "1");
    for (key, value) in &config.producer_config {
        client.set(key, value);
    }
    let timeout_ms = config
        .delivery_timeout
        .as_millis()
        .clamp(1, u128::from(u32::MAX >> 1));
    client
        .set("enable.idempotence", "true")
        .set("enable.gapless.guarantee", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout_ms.to_string())
        .create()
        .map_err(|e| Error::broker("creating the Kafka producer", e))
}
