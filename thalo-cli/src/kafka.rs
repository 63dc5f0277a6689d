//! Kafka, read-only but for `projection reset --reset-group`: consumer-group lag and
//! dead-letter messages.
//!
//! Every read here uses a plain consumer with a throwaway group id that never joins the
//! group and never commits: it assigns partitions itself and reads up to the high
//! watermark, so looking at a dead-letter topic or a group's offsets changes nothing.
//! rdkafka's consumer calls block, so they run on tokio's blocking threads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use thalo_kafka::message::header;
use thalo_kafka::rdkafka::admin::{AdminClient, AdminOptions};
use thalo_kafka::rdkafka::client::DefaultClientContext;
use thalo_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use thalo_kafka::rdkafka::error::KafkaError;
use thalo_kafka::rdkafka::message::{BorrowedMessage, Headers};
use thalo_kafka::rdkafka::metadata::Metadata;
use thalo_kafka::rdkafka::types::RDKafkaErrorCode;
use thalo_kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use thalo_kafka::{KafkaConfig, TopicNaming, CONFIG_FILE_ENV, PROPERTY_ENV_PREFIX};

use crate::args::KafkaArgs;
use crate::error::{CliError, Result};

/// The cluster, as the command line names it.
#[derive(Debug, Clone)]
pub(crate) struct Kafka {
    config: KafkaConfig,
    timeout: Duration,
}

/// One partition of a group's topics.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (the next message it reads), if it committed one.
    pub committed: Option<i64>,
    pub low_watermark: i64,
    pub high_watermark: i64,
    /// Messages the group has not consumed: high watermark minus the committed offset,
    /// or every message still in the partition when nothing is committed.
    pub lag: i64,
}

/// A consumer group's position.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GroupLag {
    pub group: String,
    pub partitions: Vec<PartitionLag>,
    pub lag: i64,
    /// Why no committed partitions are shown, if so.
    pub note: Option<String>,
}

/// One header of a message.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HeaderValue {
    pub key: String,
    pub value: Option<String>,
}

/// A message of a dead-letter topic.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<DateTime<Utc>>,
    pub key: Option<String>,
    pub headers: Vec<HeaderValue>,
    pub value: Option<Vec<u8>>,
}

impl DeadLetter {
    /// The value of header `key` (the first, if repeated).
    pub(crate) fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value.as_deref())
    }

    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| HeaderValue {
                        key: h.key.to_owned(),
                        value: h.value.map(text),
                    })
                    .collect()
            })
            .unwrap_or_default();
        DeadLetter {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis),
            key: message.key().map(text),
            headers,
            value: message.payload().map(<[u8]>::to_vec),
        }
    }
}

impl Kafka {
    /// The configuration of `thalo-relay`: `KafkaConfig::from_env`, then `--brokers`,
    /// then every `-X`.
    ///
    /// # Errors
    ///
    /// [`CliError::Thalo`] when the properties file cannot be read.
    pub(crate) fn new(args: &KafkaArgs) -> Result<Self> {
        let mut config = KafkaConfig::from_env()?;
        if let Some(brokers) = &args.brokers {
            config = config.set("bootstrap.servers", brokers.as_str());
        }
        for (key, value) in &args.properties {
            config = config.set(key.as_str(), value.as_str());
        }
        let config = config
            .with_topic_naming(TopicNaming::prefixed(args.topic_prefix.as_str()))
            .with_group_prefix(args.group_prefix.as_str());
        Ok(Kafka {
            config,
            timeout: Duration::from_millis(args.kafka_timeout_ms.max(1)),
        })
    }

    /// Whether a broker was named at all: `--brokers` / `KAFKA_BROKERS`, a
    /// `THALO_KAFKA_CONFIG` file, `THALO_KAFKA_BOOTSTRAP_SERVERS` or
    /// `-X bootstrap.servers`. (`status` leaves Kafka out otherwise, rather than report
    /// the default address unreachable.)
    pub(crate) fn configured(args: &KafkaArgs) -> bool {
        args.brokers.is_some()
            || std::env::var_os(CONFIG_FILE_ENV).is_some()
            || std::env::var_os(format!("{PROPERTY_ENV_PREFIX}BOOTSTRAP_SERVERS")).is_some()
            || args
                .properties
                .iter()
                .any(|(k, _)| k == "bootstrap.servers")
    }

    /// The bootstrap servers.
    pub(crate) fn brokers(&self) -> &str {
        self.config.brokers()
    }

    /// The topic of an aggregate type.
    pub(crate) fn topic(&self, aggregate_type: &str) -> String {
        self.config.topic_naming().topic(aggregate_type)
    }

    /// The consumer group of the Kafka-fed projection with checkpoint key `key`, as its
    /// consumer derives it: `<group prefix><key>`.
    pub(crate) fn projection_group(&self, key: &str) -> String {
        thalo_kafka::projection_group_id(self.config.group_prefix(), key)
    }

    /// Checks that the cluster answers, with the client's reason in words if not.
    ///
    /// # Errors
    ///
    /// The error of [`KafkaConfig::check`].
    pub(crate) async fn check(&self) -> Result<(), thalo::Error> {
        self.config.check(self.timeout).await
    }

    /// A consumer that reads for `group` (or a throwaway group): no auto commit, no
    /// offset store, never subscribed.
    fn consumer(&self, group: Option<&str>) -> Result<BaseConsumer> {
        let mut config: ClientConfig = self.config.client_config();
        let throwaway = format!("thalo-cli-{}", uuid::Uuid::new_v4().simple());
        config
            .set("group.id", group.unwrap_or(&throwaway))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("enable.partition.eof", "true");
        config
            .create()
            .map_err(CliError::kafka("creating a Kafka consumer"))
    }

    /// The lag of each of `groups` per partition: of the topics the group has committed
    /// offsets on, or, when it has none, of `fallback_topics` (the aggregate topics).
    ///
    /// # Errors
    ///
    /// [`CliError::Kafka`] when the metadata, the committed offsets or the watermarks
    /// cannot be read.
    pub(crate) async fn group_lag(
        &self,
        groups: Vec<String>,
        fallback_topics: Vec<String>,
    ) -> Result<Vec<GroupLag>> {
        let kafka = self.clone();
        blocking(move || kafka.group_lag_blocking(&groups, &fallback_topics)).await
    }

    fn group_lag_blocking(
        &self,
        groups: &[String],
        fallback_topics: &[String],
    ) -> Result<Vec<GroupLag>> {
        let reader = self.consumer(None)?;
        let metadata = reader
            .fetch_metadata(None, self.timeout)
            .map_err(CliError::kafka("reading the cluster's topics"))?;
        let partitions = topic_partitions(&metadata);
        let mut all = TopicPartitionList::new();
        for (topic, count) in &partitions {
            // Internal topics (`__consumer_offsets`) hold no events.
            if !topic.starts_with("__") {
                for partition in 0..*count {
                    all.add_partition(topic, partition);
                }
            }
        }
        let mut watermarks: HashMap<(String, i32), (i64, i64)> = HashMap::new();
        let mut out = Vec::with_capacity(groups.len());
        for group in groups {
            let consumer = self.consumer(Some(group))?;
            let committed = if all.count() == 0 {
                TopicPartitionList::new()
            } else {
                consumer
                    .committed_offsets(all.clone(), self.timeout)
                    .map_err(CliError::kafka(format!(
                        "reading the committed offsets of group `{group}`"
                    )))?
            };
            let mut rows: Vec<(String, i32, Option<i64>)> = committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(n) => Some((e.topic().to_owned(), e.partition(), Some(n))),
                    _ => None,
                })
                .collect();
            let mut note = None;
            if rows.is_empty() {
                note = Some("no committed offsets".to_owned());
                for topic in fallback_topics {
                    if let Some(count) = partitions.get(topic) {
                        rows.extend((0..*count).map(|p| (topic.clone(), p, None)));
                    }
                }
            }
            rows.sort();
            let mut lags = Vec::with_capacity(rows.len());
            for (topic, partition, committed) in rows {
                let key = (topic.clone(), partition);
                let (low, high) = match watermarks.get(&key) {
                    Some(marks) => *marks,
                    None => {
                        let marks = reader
                            .fetch_watermarks(&topic, partition, self.timeout)
                            .map_err(CliError::kafka(format!(
                                "reading the watermarks of `{topic}` partition {partition}"
                            )))?;
                        watermarks.insert(key, marks);
                        marks
                    }
                };
                let lag = match committed {
                    Some(offset) => (high - offset).max(0),
                    None => (high - low).max(0),
                };
                lags.push(PartitionLag {
                    topic,
                    partition,
                    committed,
                    low_watermark: low,
                    high_watermark: high,
                    lag,
                });
            }
            out.push(GroupLag {
                group: group.clone(),
                lag: lags.iter().map(|p| p.lag).sum(),
                partitions: lags,
                note,
            });
        }
        Ok(out)
    }

    /// The most recent `limit` messages of every partition of `topics`, or of every
    /// topic whose name ends with `suffix` when `topics` is empty; in topic, partition
    /// and offset order.
    ///
    /// # Errors
    ///
    /// [`CliError::Kafka`] when a topic does not exist or cannot be read.
    pub(crate) async fn dead_letters(
        &self,
        topics: Vec<String>,
        suffix: String,
        limit: u64,
    ) -> Result<(Vec<String>, Vec<DeadLetter>)> {
        let kafka = self.clone();
        blocking(move || kafka.dead_letters_blocking(topics, &suffix, limit)).await
    }

    fn dead_letters_blocking(
        &self,
        topics: Vec<String>,
        suffix: &str,
        limit: u64,
    ) -> Result<(Vec<String>, Vec<DeadLetter>)> {
        let consumer = self.consumer(None)?;
        let metadata = consumer
            .fetch_metadata(None, self.timeout)
            .map_err(CliError::kafka("reading the cluster's topics"))?;
        let partitions = topic_partitions(&metadata);
        let topics = if topics.is_empty() {
            let mut found: Vec<String> = partitions
                .keys()
                .filter(|t| t.ends_with(suffix))
                .cloned()
                .collect();
            found.sort();
            found
        } else {
            topics
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut messages = Vec::new();
        for topic in &topics {
            let Some(count) = partitions.get(topic) else {
                return Err(CliError::Kafka {
                    context: format!("reading dead-letter topic `{topic}`"),
                    source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
                });
            };
            for partition in 0..*count {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition, self.timeout)
                    .map_err(CliError::kafka(format!(
                        "reading the watermarks of `{topic}` partition {partition}"
                    )))?;
                let from = low.max(high.saturating_sub(limit));
                messages.extend(self.read(&consumer, topic, partition, from, high)?);
            }
        }
        Ok((topics, messages))
    }

    /// The message at `offset` of `topic`'s `partition`.
    ///
    /// # Errors
    ///
    /// [`CliError::NoMessage`] when there is none (out of range, or compacted away),
    /// [`CliError::Kafka`] when it cannot be read.
    pub(crate) async fn message(
        &self,
        topic: String,
        partition: i32,
        offset: i64,
    ) -> Result<DeadLetter> {
        let kafka = self.clone();
        blocking(move || {
            let consumer = kafka.consumer(None)?;
            let (low, high) = consumer
                .fetch_watermarks(&topic, partition, kafka.timeout)
                .map_err(CliError::kafka(format!(
                    "reading the watermarks of `{topic}` partition {partition}"
                )))?;
            let missing = || CliError::NoMessage {
                topic: topic.clone(),
                partition,
                offset,
            };
            if offset < low || offset >= high {
                return Err(missing());
            }
            kafka
                .read(&consumer, &topic, partition, offset, offset + 1)?
                .into_iter()
                .find(|m| m.offset == offset)
                .ok_or_else(missing)
        })
        .await
    }

    /// Reads `partition` of `topic` from offset `from` up to, not including, `to`.
    fn read(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<Vec<DeadLetter>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(CliError::kafka("assigning a partition"))?;
        consumer
            .assign(&assignment)
            .map_err(CliError::kafka(format!(
                "reading `{topic}` partition {partition}"
            )))?;
        let mut out = Vec::new();
        // The deadline restarts with every message: a slow topic is read to the end, a
        // dead broker ends the read.
        let mut deadline = Instant::now() + self.timeout;
        let mut last = from - 1;
        while last + 1 < to {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CliError::Kafka {
                    context: format!(
                        "reading `{topic}` partition {partition}: offset {} did not arrive \
                         within {} ms",
                        last + 1,
                        self.timeout.as_millis()
                    ),
                    source: KafkaError::NoMessageReceived,
                });
            }
            match consumer.poll(left) {
                None => {}
                // The end of the partition, before `to` when its last offsets hold no
                // message (transaction markers, compaction).
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(err)) => {
                    return Err(CliError::kafka(format!(
                        "reading `{topic}` partition {partition}"
                    ))(err))
                }
                Some(Ok(message)) => {
                    last = message.offset();
                    if message.offset() < to {
                        out.push(DeadLetter::from_message(&message));
                    }
                    deadline = Instant::now() + self.timeout;
                }
            }
        }
        consumer
            .unassign()
            .map_err(CliError::kafka("ending a partition read"))?;
        Ok(out)
    }

    /// Deletes consumer group `group` and its committed offsets; `false` when there was
    /// no such group.
    ///
    /// # Errors
    ///
    /// [`CliError::Kafka`] when the group still has members (stop its consumers first)
    /// or the cluster refuses.
    pub(crate) async fn delete_group(&self, group: &str) -> Result<bool> {
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client_config()
            .create()
            .map_err(CliError::kafka("creating a Kafka admin client"))?;
        let options = AdminOptions::new().request_timeout(Some(self.timeout));
        let results = admin
            .delete_groups(&[group], &options)
            .await
            .map_err(CliError::kafka(format!(
                "deleting consumer group `{group}`"
            )))?;
        // One group asked for, one result.
        if let Some(result) = results.into_iter().next() {
            match result {
                Ok(_) => return Ok(true),
                Err((_, RDKafkaErrorCode::GroupIdNotFound)) => return Ok(false),
                Err((_, RDKafkaErrorCode::NonEmptyGroup)) => {
                    return Err(CliError::Kafka {
                        context: format!(
                            "consumer group `{group}` still has members: stop its consumers, \
                             then reset again"
                        ),
                        source: KafkaError::AdminOp(RDKafkaErrorCode::NonEmptyGroup),
                    })
                }
                Err((_, code)) => {
                    return Err(CliError::Kafka {
                        context: format!("deleting consumer group `{group}`"),
                        source: KafkaError::AdminOp(code),
                    })
                }
            }
        }
        Ok(false)
    }
}

/// Partitions per topic, for the topics the metadata has without error.
fn topic_partitions(metadata: &Metadata) -> HashMap<String, i32> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            let count = i32::try_from(t.partitions().len()).unwrap_or(i32::MAX);
            (t.name().to_owned(), count)
        })
        .collect()
}

/// Runs a blocking Kafka call on tokio's blocking threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| CliError::Task { source })?
}

/// The summary of a dead letter: why it is there and where it came from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeadLetterSummary {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: Option<String>,
    pub error: Option<String>,
    pub group: Option<String>,
    pub attempts: Option<String>,
    pub original_topic: Option<String>,
    pub original_partition: Option<String>,
    pub original_offset: Option<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<String>,
    pub dead_lettered_at: Option<String>,
}

impl From<&DeadLetter> for DeadLetterSummary {
    fn from(m: &DeadLetter) -> Self {
        let get = |key: &str| m.header(key).map(str::to_owned);
        DeadLetterSummary {
            topic: m.topic.clone(),
            partition: m.partition,
            offset: m.offset,
            reason: get(header::DLQ_REASON),
            error: get(header::DLQ_ERROR),
            group: get(header::DLQ_GROUP),
            attempts: get(header::DLQ_ATTEMPTS),
            original_topic: get(header::DLQ_TOPIC),
            original_partition: get(header::DLQ_PARTITION),
            original_offset: get(header::DLQ_OFFSET),
            aggregate_type: get(header::AGGREGATE_TYPE),
            aggregate_id: get(header::AGGREGATE_ID).or_else(|| m.key.clone()),
            sequence: get(header::SEQUENCE),
            dead_lettered_at: get(header::DLQ_TIME),
        }
    }
}
