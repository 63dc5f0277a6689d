//! Library loans: the service that `docs/first-service.md` builds, step by step.
//!
//! HTTP -> [`Member`] commands -> Postgres event store (events and outbox rows in one
//! transaction) -> outbox relay -> Kafka -> consumer -> the [`loans`](loans::Loans) read
//! model in Postgres (exactly once) -> HTTP reads. A command answers once the read model
//! shows it (read-your-writes).

pub mod http;
pub mod loans;
pub mod member;

use std::future::Future;
use std::time::Duration;

use thalo::{Error, Repository, ResultExt as _, Shutdown};
use thalo_kafka::{KafkaConfig, KafkaConsumer, KafkaRelay, TopicNaming};
use thalo_postgres::sqlx::PgPool;
use thalo_postgres::PgEventStore;
use tokio::net::TcpListener;

use crate::http::AppState;
use crate::loans::Loans;
use crate::member::Member;

/// Where the service keeps its data and how it names things there.
#[derive(Clone, Debug)]
pub struct Config {
    /// The Postgres URL.
    pub database_url: String,
    /// The Kafka bootstrap servers, `host:port[,host:port...]`.
    pub kafka_brokers: String,
    /// The Postgres schema of the event store and the read model.
    pub schema: String,
    /// Put in front of the topic name (`member`).
    pub topic_prefix: String,
    /// Put in front of the projection's consumer group (`loans`).
    pub group_prefix: String,
    /// How long a command waits for the read model to show it.
    pub projection_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/thalo_test".to_owned(),
            kafka_brokers: "127.0.0.1:9092".to_owned(),
            schema: "library".to_owned(),
            topic_prefix: String::new(),
            group_prefix: String::new(),
            projection_timeout: Duration::from_secs(10),
        }
    }
}

/// Runs the service on `listener` until `shutdown` is triggered: migrates the store,
/// creates the read model, and runs the outbox relay, the read model's consumer and the
/// HTTP API. When one of them stops with an error, the others stop too.
///
/// # Errors
///
/// [`Error::Store`] when Postgres is unreachable at the start, or the first error of
/// the relay, the consumer or the HTTP server. Broker outages are no error: the relay
/// and the consumer retry until the broker is back.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    let pool = PgPool::connect(&config.database_url)
        .await
        .store_err("connecting to Postgres")?;
    let store = PgEventStore::builder(pool).schema(config.schema).build()?;
    store.migrate().await?;
    let loans = Loans::new(&store).await?;

    // One Kafka configuration for the relay and the consumer, so that they agree on
    // the cluster and the topic names.
    let kafka = KafkaConfig::new(config.kafka_brokers)
        .with_topic_naming(TopicNaming::prefixed(config.topic_prefix))
        .with_group_prefix(config.group_prefix);
    // Postgres -> Kafka: every stored event, in order per member, to the topic `member`.
    let relay = KafkaRelay::from_store(&store, kafka.brokers()).with_kafka_config(&kafka);
    // Kafka -> the loans table, exactly once, in the consumer group `loans`.
    let consumer = KafkaConsumer::for_projection_from_kafka_config(&kafka).subscribe::<Member>();

    let app = http::router(AppState {
        repository: Repository::new(store.clone()),
        loans: loans.clone(),
        projection_timeout: config.projection_timeout,
    });
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let shutdown = shutdown.clone();
        async move { shutdown.triggered().await }
    });

    let (relay, consumer, server) = tokio::join!(
        stop_all_after(&shutdown, relay.run(shutdown.clone())),
        stop_all_after(
            &shutdown,
            consumer.run_projection(store, loans, shutdown.clone())
        ),
        stop_all_after(&shutdown, async {
            server.await.map_err(|e| Error::handler("http server", e))
        }),
    );
    relay.and(consumer).and(server)
}

/// Runs one part of the service, then stops the others: a service whose relay or
/// consumer died must not go on taking commands.
async fn stop_all_after<T>(
    shutdown: &Shutdown,
    part: impl Future<Output = Result<T, Error>>,
) -> Result<(), Error> {
    let result = part.await;
    shutdown.trigger();
    result.map(drop)
}
