//! # Thalo on Kafka
//!
//! Two halves connect a Thalo service to Kafka (or any broker that speaks the Kafka
//! protocol: Redpanda, tansu, ...):
//!
//! - [`KafkaRelay`] publishes the events that `thalo_postgres::PgEventStore` stores. The
//!   store writes each event and an outbox row in one transaction; the relay turns outbox
//!   rows into Kafka messages and deletes them once Kafka has acknowledged them. Run it
//!   in your service or as the `thalo-relay` binary.
//! - [`KafkaConsumer`] feeds those messages to [`thalo::EventHandler`]s, or to
//!   `thalo_postgres::PgProjection`s with exactly-once effects.
//!
//! ```no_run
//! # #[derive(Clone, Debug)] pub struct BankAccountEvent;
//! # impl thalo::Event for BankAccountEvent {
//! #     fn event_type(&self) -> &'static str { "X" }
//! #     fn encode(&self) -> Result<String, thalo::Error> { Ok("{}".into()) }
//! #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, thalo::Error> { Ok(BankAccountEvent) }
//! #     fn event_types() -> &'static [&'static str] { &["X"] }
//! # }
//! # struct Balances;
//! # impl thalo_postgres::PgProjection<BankAccountEvent> for Balances {
//! #     fn name(&self) -> &str { "balances" }
//! #     async fn handle(&self, _: &mut sqlx::PgConnection, _: &thalo::EventEnvelope<BankAccountEvent>) -> Result<(), thalo::Error> { Ok(()) }
//! # }
//! # async fn example() -> Result<(), thalo::Error> {
//! use thalo_kafka::{KafkaConsumer, KafkaRelay};
//! use thalo_postgres::PgEventStore;
//!
//! let store = PgEventStore::connect("postgres://postgres@127.0.0.1:5432/bank").await?;
//! store.migrate().await?;
//! let shutdown = thalo::Shutdown::on_signal();
//!
//! // Postgres -> Kafka: topic `bank_account`, key = account id, value = event JSON.
//! let relay = KafkaRelay::from_store(&store, "127.0.0.1:9092");
//! let relay_task = tokio::spawn({
//!     let shutdown = shutdown.clone();
//!     async move { relay.run(shutdown).await }
//! });
//!
//! // Kafka -> read model, exactly once.
//! KafkaConsumer::new("127.0.0.1:9092", "balances")
//!     .with_topic("bank_account")
//!     .run_projection(store, Balances, shutdown)
//!     .await?;
//! relay_task.await.ok();
//! # Ok(())
//! # }
//! ```
//!
//! ## Messages
//!
//! One event per message: topic per aggregate type ([`TopicNaming`]), key = aggregate
//! id, value = the event's JSON payload, and headers in the CloudEvents Kafka binding
//! (`ce_id`, `ce_type`, `ce_source`, `ce_time`, ...) plus `thalo_*` headers for the
//! sequence, global position, schema version, correlation and causation ids and the
//! free-form metadata headers. Any Kafka client in any language can read them; see
//! [`message`] for the full list.
//!
//! ## Delivery guarantees
//!
//! | stage                        | guarantee                                              | where it is explained |
//! |------------------------------|--------------------------------------------------------|-----------------------|
//! | store -> outbox              | atomic: an event is stored with its outbox row or not at all | `thalo_postgres` |
//! | outbox -> Kafka              | at least once, in order per aggregate                  | [`relay`]             |
//! | Kafka -> [`thalo::EventHandler`] | at least once, in order per aggregate              | [`consumer`]          |
//! | Kafka -> `PgProjection`      | exactly-once effects                                   | [`projection`]        |
//!
//! Duplicates happen after crashes (the relay republishes a batch whose rows it had not
//! deleted yet; a consumer re-handles messages since its last offset commit). Handlers
//! should be idempotent; Postgres projections are, by construction.
//!
//! Duplicates never reach a handler out of order: every message carries its
//! aggregate's sequence and the relay leader's epoch, and consumers drop a sequence
//! they have seen or a message from a deposed leader.
//!
//! ## Nothing stalls, nothing is skipped
//!
//! - An event the broker refuses for good parks its *aggregate* in the outbox (see
//!   [`relay`]); the others keep flowing. [`KafkaRelay::parked`], [`KafkaRelay::retry`]
//!   and [`KafkaRelay::skip`] are the operator's tools.
//! - A message that cannot be decoded, or whose handler keeps failing, parks its
//!   aggregate's *stream* for that consumer: its later events are held, not handled
//!   past the hole (sequenced dead letters), and a sequence gap parks it too. Each such
//!   message is also written to a dead-letter topic (`<topic>.dlq`) with the reason in
//!   its headers, and the consumer moves on with the other aggregates. Projections are
//!   re-driven from the store, exactly once (`PgEventStore::redrive_projection`); see
//!   [`consumer`].
//! - Outages (broker or database unreachable) are retried until they end.
//!
//! ## Running the relay
//!
//! One relay per outbox publishes at a time; start two or more for availability: they
//! elect a leader through a Postgres advisory lock, and a standby takes over within a
//! second when the leader dies. The `thalo-relay` binary runs one from the command
//! line:
//!
//! ```text
//! DATABASE_URL=postgres://... KAFKA_BROKERS=broker:9092 thalo-relay --schema thalo --topic-prefix bank.
//! ```
//!
//! ## Secured clusters: TLS and SASL
//!
//! One [`KafkaConfig`] (bootstrap servers, librdkafka properties, topic naming) configures
//! the relay ([`KafkaRelay::with_kafka_config`]) and the consumers
//! ([`KafkaConsumer::from_kafka_config`]), and its properties reach every client they
//! create: producer, consumer, dead-letter producer and admin clients. Build it in code,
//! from a properties file ([`KafkaConfig::from_file`]) or from the environment
//! ([`KafkaConfig::from_env`]: `KAFKA_BROKERS`, `THALO_KAFKA_CONFIG=<file>`,
//! `THALO_KAFKA_<NAME>` for each property). [`KafkaConfig::check`] says at start-up,
//! in words, when a certificate does not verify or the cluster cannot be reached.
//!
//! ```text
//! KAFKA_BROKERS=pkc-xxxx.confluent.cloud:9092 \
//! THALO_KAFKA_SECURITY_PROTOCOL=SASL_SSL THALO_KAFKA_SASL_MECHANISMS=PLAIN \
//! THALO_KAFKA_SASL_USERNAME=$KEY THALO_KAFKA_SASL_PASSWORD=$SECRET thalo-relay
//! thalo-relay -X security.protocol=ssl -X ssl.ca.location=/etc/kafka/ca.pem
//! ```
//!
//! librdkafka is built with OpenSSL compiled from source (`rdkafka`'s `ssl-vendored`
//! feature): TLS, SASL PLAIN and SCRAM work on any machine with a C toolchain, `make`
//! and `perl`, whatever OpenSSL the system has (or lacks). GSSAPI (Kerberos) is not
//! built in.
//!
//! ## Metrics and readiness
//!
//! The relay and the consumers record through the `metrics` facade (the `thalo_relay_*`,
//! `thalo_outbox_*`, `thalo_consumer_*` and `thalo_dead_letters_total` metrics, listed
//! in the `thalo` crate docs); install the application's recorder before they start.
//! For readiness checks, [`KafkaRelay::status`] says whether a relay runs and leads, and
//! [`KafkaConsumer::handle`] gives a [`ConsumerHandle`] that says whether a consumer
//! runs, has joined its group, and which partitions it holds.
//!
//! ## Traces
//!
//! A message carries its event's W3C trace context ([`thalo::Metadata::traceparent`])
//! in the headers `traceparent` and `tracestate` (see [`message`]), and
//! [`decode_raw_message`] puts it back into the metadata. The consumer handles each
//! batch it takes from a partition in a `consume` span (`topic`, `partition`,
//! `messages`) and each message in a `handle` span (`topic`, `partition`, `offset`,
//! `aggregate_type`, `aggregate_id`, `sequence`, `event_type`, `traceparent`). With the
//! `opentelemetry` feature and `tracing-opentelemetry`'s layer installed, the `handle`
//! span continues the trace its message names (its parent is the remote span of the
//! `traceparent`: the `execute` span of the command that stored the event), and the
//! `consume` span of a batch a projection applies in one transaction links to each of
//! its messages' contexts.
//!
//! ## Feature flags
//!
//! - `postgres` (default): [`KafkaRelay`] and [`KafkaConsumer::run_projection`] (pulls in
//!   `sqlx` and `thalo-postgres`). Without it, the crate has the consumer for plain
//!   event handlers only.
//! - `cli` (default): the `thalo-relay` binary.
//! - `opentelemetry`: consumers' `handle` spans continue the trace of their message's
//!   `traceparent` as their OpenTelemetry parent (pulls in `opentelemetry` and
//!   `tracing-opentelemetry`; turns on `thalo/opentelemetry`, so commands that handlers
//!   run carry the trace on).
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod consumer;
pub mod message;
#[cfg(feature = "postgres")]
pub mod projection;
#[cfg(feature = "postgres")]
pub mod relay;

mod backoff;
mod config;
mod topic;
mod trace;

pub use backoff::RetryPolicy;
pub use config::{KafkaConfig, BROKERS_ENV, CONFIG_FILE_ENV, PROPERTY_ENV_PREFIX};
pub use consumer::{ConsumerHandle, ConsumerStats, KafkaConsumer};
pub use message::{decode_message, decode_raw_message, encode_headers, error_chain};
#[cfg(feature = "postgres")]
pub use relay::{KafkaRelay, RelayLag, RelayStatus};
pub use topic::{ensure_topics, TopicNaming, TopicSettings};

/// The rdkafka version this crate is built with, re-exported for raw access (admin
/// operations, custom producers) with the same types.
pub use rdkafka;
