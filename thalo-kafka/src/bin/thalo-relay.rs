//! `thalo-relay`: publishes a Thalo Postgres event store's outbox to Kafka.
//!
//! Runs until SIGINT or SIGTERM, then finishes the batch in hand and releases the
//! outbox lock. Start several for availability: one publishes, the others stand by.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sqlx::postgres::PgPoolOptions;
use thalo_kafka::{KafkaConfig, KafkaRelay, TopicNaming, TopicSettings};
use thalo_postgres::SchemaName;
use tracing_subscriber::EnvFilter;

/// Publishes the events of a Thalo Postgres event store to Kafka, in order per
/// aggregate, at least once.
#[derive(Debug, Parser)]
#[command(name = "thalo-relay", version)]
struct Args {
    /// Postgres connection URL of the event store.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,

    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,

    /// Schema of the event store's tables.
    #[arg(long, env = "THALO_SCHEMA", default_value = SchemaName::DEFAULT)]
    schema: String,

    /// Outbox rows per batch.
    #[arg(long, env = "THALO_RELAY_BATCH_SIZE", default_value_t = KafkaRelay::DEFAULT_BATCH_SIZE)]
    batch_size: usize,

    /// Prefix of topic names: events of aggregate `x` go to topic `<prefix>x`.
    #[arg(long, env = "THALO_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,

    /// Milliseconds between outbox polls when no notification arrives.
    #[arg(long, env = "THALO_RELAY_POLL_INTERVAL_MS", default_value_t = 1000)]
    poll_interval_ms: u64,

    /// Milliseconds the broker has to acknowledge a message before it counts as a
    /// retriable failure of its aggregate (librdkafka `message.timeout.ms`).
    #[arg(
        long,
        env = "THALO_RELAY_DELIVERY_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    delivery_timeout_ms: u64,

    /// Partitions of topics the relay creates.
    #[arg(long, env = "THALO_TOPIC_PARTITIONS", default_value_t = 6)]
    partitions: i32,

    /// Replication factor of topics the relay creates.
    #[arg(long, env = "THALO_TOPIC_REPLICATION", default_value_t = 1)]
    replication_factor: i32,

    /// Do not create missing topics (they are provisioned elsewhere).
    #[arg(long)]
    no_create_topics: bool,

    /// librdkafka properties, `key=value` (repeatable), e.g. `-X compression.type=lz4`,
    /// `-X security.protocol=SASL_SSL`. They come after those of the file named by
    /// `THALO_KAFKA_CONFIG` and of the `THALO_KAFKA_<NAME>` variables (see
    /// `KafkaConfig::from_env`), and win over them.
    #[arg(
        short = 'X',
        long = "kafka-property",
        alias = "producer-property",
        value_parser = parse_property
    )]
    kafka_properties: Vec<(String, String)>,

    /// Postgres connections of the relay's pool.
    #[arg(long, env = "THALO_PG_MAX_CONNECTIONS", default_value_t = 4)]
    pg_max_connections: u32,

    /// How long to wait for a Postgres connection from the pool, in milliseconds.
    #[arg(long, env = "THALO_PG_ACQUIRE_TIMEOUT_MS", default_value_t = 10_000)]
    pg_acquire_timeout_ms: u64,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, found `{text}`"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "thalo-relay failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), thalo::Error> {
    let schema = SchemaName::new(args.schema)?;
    // Connecting lazily: the relay retries until the database is reachable.
    let pool = PgPoolOptions::new()
        .max_connections(args.pg_max_connections.max(2))
        .acquire_timeout(Duration::from_millis(args.pg_acquire_timeout_ms))
        .connect_lazy(&args.database_url)
        .map_err(|e| thalo::Error::config(format!("invalid DATABASE_URL: {e}")))?;
    let mut kafka = KafkaConfig::from_env()?.set("bootstrap.servers", args.brokers);
    for (key, value) in args.kafka_properties {
        kafka = kafka.set(key, value);
    }
    let kafka = kafka.with_topic_naming(TopicNaming::prefixed(args.topic_prefix));
    // A wrong CA, password or address is reported now, in words; the relay itself
    // keeps retrying (the cluster may just not be up yet).
    if let Err(err) = kafka.check(Duration::from_secs(10)).await {
        tracing::error!(error = %thalo_kafka::error_chain(&err), "the Kafka cluster is not reachable yet; the relay keeps trying");
    }
    let relay = KafkaRelay::new(pool, kafka.brokers())
        .with_kafka_config(&kafka)
        .with_schema(schema)
        .with_batch_size(args.batch_size)
        .with_poll_interval(Duration::from_millis(args.poll_interval_ms))
        .with_delivery_timeout(Duration::from_millis(args.delivery_timeout_ms))
        .with_topic_settings(
            TopicSettings::default()
                .with_create(!args.no_create_topics)
                .with_partitions(args.partitions)
                .with_replication_factor(args.replication_factor),
        );
    relay.run(thalo::Shutdown::on_signal()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_properties() {
        assert_eq!(
            parse_property("compression.type=lz4"),
            Ok(("compression.type".into(), "lz4".into()))
        );
        assert!(parse_property("nokey").is_err());
        assert!(parse_property("=v").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
