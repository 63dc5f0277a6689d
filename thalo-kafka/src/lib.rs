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
//! A service runs both: the relay publishes what its commands store, and a consumer
//! feeds a read model. Everything it names comes from `thalo` and `thalo_kafka` (which
//! re-exports the Postgres types a relay and a projection need, and `sqlx`):
//!
//! ```no_run
//! use thalo::{Error, EventEnvelope, Shutdown};
//! use thalo_kafka::sqlx::{self, PgConnection};
//! use thalo_kafka::{KafkaConfig, KafkaConsumer, KafkaRelay, PgEventStore, PgProjection};
//!
//! #[derive(thalo::Aggregate, Clone, Debug, Default)]
//! pub struct BankAccount {
//!     #[identity]
//!     id: String,
//!     balance: i64,
//! }
//!
//! #[thalo::commands]
//! impl BankAccount {
//!     pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> {
//!         Ok(DepositedEvent { amount })
//!     }
//! }
//!
//! #[thalo::events]
//! impl BankAccount {
//!     pub fn deposited(&mut self, amount: i64) {
//!         self.balance += amount;
//!     }
//! }
//!
//! /// The read model: one row per account, in the store's schema.
//! struct Balances {
//!     upsert: String,
//! }
//!
//! impl PgProjection<BankAccountEvent> for Balances {
//!     fn name(&self) -> &str {
//!         "balances" // with the version, names its checkpoints and its consumer group
//!     }
//!
//!     async fn handle(
//!         &self,
//!         tx: &mut PgConnection,
//!         envelope: &EventEnvelope<BankAccountEvent>,
//!     ) -> Result<(), Error> {
//!         let BankAccountEvent::Deposited(deposited) = &envelope.event;
//!         sqlx::query(&self.upsert)
//!             .bind(&envelope.aggregate_id)
//!             .bind(deposited.amount)
//!             .execute(tx)
//!             .await
//!             .map_err(|e| Error::store("updating balances", e))?;
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let store = PgEventStore::connect("postgres://postgres@127.0.0.1:5432/bank").await?;
//!     store.migrate().await?;
//!     let table = store.schema().qualify("balances");
//!     sqlx::query(&format!(
//!         "CREATE TABLE IF NOT EXISTS {table} (account TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
//!     ))
//!     .execute(store.pool())
//!     .await
//!     .map_err(|e| Error::store("creating balances", e))?;
//!     let balances = Balances {
//!         upsert: format!(
//!             "INSERT INTO {table} (account, cents) VALUES ($1, $2)
//!              ON CONFLICT (account) DO UPDATE SET cents = {table}.cents + EXCLUDED.cents"
//!         ),
//!     };
//!
//!     // KAFKA_BROKERS, THALO_KAFKA_CONFIG, THALO_KAFKA_<PROPERTY>: one configuration
//!     // for the relay and the consumer.
//!     let kafka = KafkaConfig::from_env()?;
//!     // Ctrl-C or SIGTERM stops both; clones share it.
//!     let shutdown = Shutdown::on_signal();
//!
//!     // Postgres -> Kafka: topic `bank_account`, key = account id, value = event JSON.
//!     let relay = KafkaRelay::from_store(&store, kafka.brokers()).with_kafka_config(&kafka);
//!     let relay_task = tokio::spawn({
//!         let shutdown = shutdown.clone();
//!         async move { relay.run(shutdown).await }
//!     });
//!
//!     // Kafka -> read model, exactly once, in consumer group `balances`.
//!     let stats = KafkaConsumer::for_projection_from_kafka_config(&kafka)
//!         .subscribe::<BankAccount>()
//!         .run_projection(store, balances, shutdown)
//!         .await?;
//!     println!("applied {}, duplicates skipped {}", stats.handled, stats.duplicates);
//!     relay_task
//!         .await
//!         .map_err(|e| Error::broker("the relay task", e))?
//! }
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
//! ## Errors in handlers: retry or dead-letter
//!
//! What a consumer does with an event is decided by the error its handler or projection
//! returns (or the decoding of its message), by one rule:
//!
//! | what went wrong | [`KafkaConsumer::run`] / [`run_projection`](KafkaConsumer::run_projection) | `thalo_postgres::PgSubscription`, [`thalo::Subscription`] (fed from the store) |
//! |---|---|---|
//! | **an outage** (see below) | retried with backoff ([`RetryPolicy`]'s delays) until it ends or shutdown; never dead-lettered, and not counted against the attempts | `PgSubscription`: an [`Error::Store`] of the store's own reads and writes, and an outage met by the projection's own queries (`thalo_postgres::database_outage`), are retried with backoff (100 ms doubling to 30 s) until it ends; `thalo::Subscription`: its store's [`Error::Store`] |
//! | **the handler fails** (any other error, or a panic) | retried up to [`RetryPolicy::max_attempts`] times in all (default 5, 200 ms doubling to 10 s), then the aggregate's stream is *parked* and the message written to `<topic>.dlq` (`thalo_dlq_reason: handler`) | the subscription stops and returns the error ([`Error::Handler`]); its checkpoint stays before the event, so the next run starts there |
//! | **the event does not decode** ([`Error::Serialization`], [`Error::UnknownEventType`], [`Error::UnknownAggregateType`]) | not retried: the stream is parked and the message dead-lettered (`decode`) | the subscription stops and returns the error |
//! | **the message has no Thalo headers** | dead-lettered (`decode`); no stream to park | - |
//! | **a sequence gap** (event n + 1 came, n never did) | the stream is parked (`gap`) | - (the store has no gaps) |
//! | **an event of a parked stream** | held, not handled, and dead-lettered as the record (`held`) until a re-drive | - |
//!
//! An *outage* is not the message's fault:
//!
//! - with the `postgres` feature, an error whose chain ([`std::error::Error::source`])
//!   holds a `sqlx::Error` that retrying gets past: I/O, TLS and protocol errors, a pool
//!   timeout or a closed pool, a crashed connection worker, and the SQLSTATEs of class
//!   `08` (connection exception), `53` (insufficient resources), `57P` (server shutdown
//!   or crash), `40001` (serialization failure) and `40P01` (deadlock). Any other SQL
//!   error (a constraint violation, a missing table) is a failure of the message, even
//!   inside an [`Error::Store`];
//! - otherwise (no `sqlx::Error` in the chain), an [`Error::Store`] or [`Error::Broker`]
//!   returned as such by a plain handler. A projection's errors reach the consumer
//!   wrapped in [`Error::Handler`] (by `PgEventStore::apply_exactly_once`), so for a
//!   projection only a transient database error in the chain is an outage.
//!
//! So: return [`Error::Store`] (`.store_err(..)`, with the driver's error as its source)
//! for the database failing under you, and [`Error::Broker`] for a remote service being
//! unreachable; they wait for the outage to end. Return anything else, [`Error::handler`]
//! with the cause, for an event the handler cannot handle: it is retried a few times and
//! then parked, and the consumer goes on with the other aggregates. A parked stream is
//! re-driven from the store once the cause is fixed (`PgEventStore::redrive_projection`,
//! `PgEventStore::redrive_handler`, or `thalo dlq redrive`), in order and exactly once
//! for a projection; see [`consumer`] for the details.
//!
//! A store-fed subscription has no dead-letter topic: it stops at the failing event
//! rather than apply past it, and a supervisor restarts it (or an operator fixes the
//! event's handler). A `PgSubscription` retries database outages (its own queries' and
//! its projection's, by the same rule as above); any other projection error stops it.
//!
//! ## Projections: one identity, read-model tables in the store's schema
//!
//! A projection's checkpoint key (its name, and `@vN` from version 2 on) names its
//! checkpoints and its consumer group (`<group prefix><checkpoint key>`, see
//! [`projection_group_id`]): a projection under a new name or version starts over with
//! new checkpoints and a new group, from the beginning of its topics. It does not clear
//! its read model's tables; a rebuild is a new version writing tables of its own
//! (`thalo_postgres::ReadModelTable`). See [`projection`] for what exactly happens.
//!
//! A projection's transaction runs with the pool's `search_path` (Thalo does not change
//! it): name read-model tables schema-qualified, in the store's schema, with
//! `thalo_postgres::ReadModelTable` (versioned) or `store.schema().qualify("name")`, as
//! the example above does. See `thalo_postgres::PgProjection`.
//!
//! ## Running the relay
//!
//! One relay per outbox publishes at a time; start two or more for availability: they
//! elect a leader through a Postgres advisory lock, and a standby takes over within a
//! second when the leader dies. The `thalo-relay` binary runs one from the command
//! line. It is behind the `cli` feature (off by default, so that a library build does
//! not pull in `clap` and `tracing-subscriber`):
//!
//! ```text
//! cargo install thalo-kafka --features cli          # installs `thalo-relay`
//! DATABASE_URL=postgres://... KAFKA_BROKERS=broker:9092 thalo-relay --schema thalo --topic-prefix bank.
//! cargo run -p thalo-kafka --features cli --bin thalo-relay -- --help   # in Thalo's workspace
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
//! feature): TLS, SASL PLAIN and SCRAM work on any machine with a C and a C++ compiler,
//! `make` and `perl`, whatever OpenSSL the system has (or lacks). GSSAPI (Kerberos) is not
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
//! `traceparent`: the relay's `relay_publish` span, or the `execute` span of the command
//! that stored the event when no recorded relay published it), and the `consume` span of
//! a batch a projection applies in one transaction links to each of its messages'
//! contexts. The relay's `relay_publish` spans and projections' `project` spans (see
//! [`relay`] and [`projection`]) put the relay and the read models into the same trace.
//!
//! ## Feature flags
//!
//! - `postgres` (default): [`KafkaRelay`] and [`KafkaConsumer::run_projection`] (pulls in
//!   `sqlx` and `thalo-postgres`). Without it, the crate has the consumer for plain
//!   event handlers only.
//! - `cli` (off by default): the `thalo-relay` binary (pulls in `clap` and
//!   `tracing-subscriber`); `cargo install thalo-kafka --features cli`.
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
pub use consumer::{ConsumerHandle, ConsumerStats, KafkaConsumer, PartitionProgress};
pub use message::{decode_message, decode_raw_message, encode_headers, error_chain};
#[cfg(feature = "postgres")]
pub use projection::projection_group_id;
#[cfg(feature = "postgres")]
pub use relay::{KafkaRelay, RelayLag, RelayStatus};
pub use topic::{ensure_topics, TopicNaming, TopicSettings};

// What running a relay or a consumer names besides this crate's own types: the error,
// the shutdown signal, and (feature `postgres`) the store, the projection trait, the
// schema name and `sqlx` of the versions this crate is built with.
pub use thalo::{Error, Shutdown};
#[cfg(feature = "postgres")]
pub use thalo_postgres::{sqlx, PgEventStore, PgProjection, SchemaName};

/// The rdkafka version this crate is built with, re-exported for raw access (admin
/// operations, custom producers) with the same types.
pub use rdkafka;
