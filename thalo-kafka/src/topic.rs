//! Topic names and topic creation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use thalo::Error;
use tracing::{debug, info};

/// Maps an aggregate type to the topic its events are published to.
///
/// The relay and the consumers must use the same naming. The default is the aggregate
/// type itself (`bank_account`); [`TopicNaming::prefixed`] puts a prefix in front
/// (`prod.bank_account`); [`TopicNaming::custom`] takes any function.
///
/// ```
/// use thalo_kafka::TopicNaming;
///
/// assert_eq!(TopicNaming::default().topic("bank_account"), "bank_account");
/// assert_eq!(TopicNaming::prefixed("prod.").topic("bank_account"), "prod.bank_account");
/// let upper = TopicNaming::custom(|aggregate_type| aggregate_type.to_uppercase());
/// assert_eq!(upper.topic("bank_account"), "BANK_ACCOUNT");
/// ```
#[derive(Clone, Default)]
pub struct TopicNaming {
    kind: NamingKind,
}

#[derive(Clone, Default)]
enum NamingKind {
    #[default]
    AggregateType,
    Prefixed(String),
    Custom(Arc<dyn Fn(&str) -> String + Send + Sync>),
}

impl TopicNaming {
    /// `<prefix><aggregate type>`.
    pub fn prefixed(prefix: impl Into<String>) -> Self {
        TopicNaming {
            kind: NamingKind::Prefixed(prefix.into()),
        }
    }

    /// Any mapping from aggregate type to topic. It must be deterministic: every
    /// event of an aggregate type must go to one topic, or per-aggregate order is lost.
    pub fn custom(f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        TopicNaming {
            kind: NamingKind::Custom(Arc::new(f)),
        }
    }

    /// The topic of `aggregate_type`.
    pub fn topic(&self, aggregate_type: &str) -> String {
        match &self.kind {
            NamingKind::AggregateType => aggregate_type.to_owned(),
            NamingKind::Prefixed(prefix) => format!("{prefix}{aggregate_type}"),
            NamingKind::Custom(f) => f(aggregate_type),
        }
    }
}

impl fmt::Debug for TopicNaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            NamingKind::AggregateType => f.write_str("TopicNaming::AggregateType"),
            NamingKind::Prefixed(p) => f.debug_tuple("TopicNaming::Prefixed").field(p).finish(),
            NamingKind::Custom(_) => f.write_str("TopicNaming::Custom(..)"),
        }
    }
}

/// How topics that do not exist yet are created.
///
/// Kafka brokers usually do not create topics on first use (and should not: the
/// partition count decides how far a topic's consumers can scale). The relay creates
/// each aggregate topic before it publishes to it, and consumers create their source
/// and dead-letter topics before they subscribe; a topic that exists already is left
/// as it is. Turn [`create`](TopicSettings::create) off when topics are provisioned
/// elsewhere.
///
/// ```
/// use thalo_kafka::TopicSettings;
///
/// let settings = TopicSettings::default()
///     .with_partitions(12)
///     .with_replication_factor(3);
/// assert_eq!((settings.partitions, settings.replication_factor), (12, 3));
/// assert!(!TopicSettings::default().with_create(false).create);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicSettings {
    /// Whether to create missing topics at all (default `true`).
    pub create: bool,
    /// Partitions of a created topic (default 6). More partitions let more consumers of
    /// a group work in parallel; an aggregate's events always stay in one partition.
    pub partitions: i32,
    /// Replication factor of a created topic (default 1; use 3 on a production cluster).
    pub replication_factor: i32,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            create: true,
            partitions: 6,
            replication_factor: 1,
        }
    }
}

impl TopicSettings {
    /// Whether to create missing topics at all.
    #[must_use]
    pub fn with_create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Partitions of a created topic.
    #[must_use]
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Replication factor of a created topic.
    #[must_use]
    pub fn with_replication_factor(mut self, replication_factor: i32) -> Self {
        self.replication_factor = replication_factor;
        self
    }
}

/// Creates topics that do not exist yet; a topic that exists is success.
///
/// # Errors
///
/// Returns [`Error::Broker`] when the broker cannot be reached or refuses to create a
/// topic for another reason than that it exists.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[String],
    settings: &TopicSettings,
) -> Result<(), Error> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    ensure_topics_with(brokers, &config, topics, settings).await
}

/// [`ensure_topics`] with an admin client made from `config` (security settings and
/// the like); `brokers` is used when `config` has no `bootstrap.servers`.
pub(crate) async fn ensure_topics_with(
    brokers: &str,
    config: &ClientConfig,
    topics: &[String],
    settings: &TopicSettings,
) -> Result<(), Error> {
    if !settings.create || topics.is_empty() {
        return Ok(());
    }
    let mut config = config.clone();
    if config.get("bootstrap.servers").is_none() {
        config.set("bootstrap.servers", brokers);
    }
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|e| Error::broker("creating the Kafka admin client", e))?;
    create_with(&admin, topics, settings).await
}

pub(crate) async fn create_with(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[String],
    settings: &TopicSettings,
) -> Result<(), Error> {
    if !settings.create || topics.is_empty() {
        return Ok(());
    }
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                settings.partitions,
                TopicReplication::Fixed(settings.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| Error::broker("creating topics", e))?;
    for result in results {
        match result {
            Ok(topic) => info!(topic, partitions = settings.partitions, "created topic"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                debug!(topic, "topic exists");
            }
            Err((topic, code)) => {
                return Err(Error::broker(
                    format!("creating topic `{topic}`"),
                    rdkafka::error::KafkaError::AdminOp(code),
                ));
            }
        }
    }
    Ok(())
}
