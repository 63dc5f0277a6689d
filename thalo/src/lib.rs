//! # Thalo
//!
//! Event sourcing and CQRS for Rust services.
//!
//! New to Thalo? [`docs/first-service.md`][first-service] builds a service step by step,
//! from a new crate to a Kafka-fed projection and read-your-writes over HTTP.
//!
//! [first-service]: https://github.com/thalo-rs/thalo/blob/main/docs/first-service.md
//!
//! An aggregate is a plain struct. Its commands are methods that take `&self` and return
//! events (or an error); its events are methods that take `&mut self` and change its
//! state. Three macros turn that into the command enum, the event structs and enum, and
//! the [`Aggregate`] implementation:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use thalo::{commands, events, Aggregate, AggregateType, Error};
//! use thalo::{InMemoryEventStore, Repository};
//!
//! #[derive(Aggregate, Clone, Debug, Default)]
//! pub struct BankAccount {
//!     #[identity]
//!     account_number: String,
//!     balance_cents: i64,
//!     opened: bool,
//! }
//!
//! #[commands]
//! impl BankAccount {
//!     /// Opens the account with an initial deposit.
//!     pub fn open_account(&self, initial_cents: i64) -> Result<AccountOpenedEvent, Error> {
//!         if self.opened {
//!             return Err(Error::invariant_code("ACCOUNT_ALREADY_OPENED"));
//!         }
//!         Ok(AccountOpenedEvent { initial_cents })
//!     }
//! }
//!
//! #[events]
//! impl BankAccount {
//!     /// The account was opened.
//!     pub fn account_opened(&mut self, initial_cents: i64) {
//!         self.balance_cents = initial_cents;
//!         self.opened = true;
//!     }
//! }
//!
//! assert_eq!(BankAccount::TYPE, "bank_account");
//!
//! let repo = Repository::new(InMemoryEventStore::new());
//! let id = "acc-1".to_string();
//! let stored = repo
//!     .execute::<BankAccount>(&id, BankAccountCommand::OpenAccount { initial_cents: 10_00 })
//!     .await?;
//! assert_eq!(stored[0].sequence, 1);
//! assert_eq!(stored[0].event.event_type(), "AccountOpened");
//!
//! // Opening it again breaks an invariant: nothing is stored.
//! let err = repo
//!     .execute::<BankAccount>(&id, BankAccountCommand::OpenAccount { initial_cents: 5_00 })
//!     .await
//!     .unwrap_err();
//! assert_eq!(err.code(), Some("ACCOUNT_ALREADY_OPENED"));
//!
//! let account = repo.load::<BankAccount>(&id).await?;
//! assert_eq!((account.aggregate.balance_cents, account.version), (10_00, 1));
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! # use thalo::Event as _;
//! ```
//!
//! `#[commands]` generates `BankAccountCommand::OpenAccount { initial_cents }`;
//! `#[events]` generates `pub struct AccountOpenedEvent { pub initial_cents: i64 }` and
//! `BankAccountEvent::AccountOpened(AccountOpenedEvent)`, which implements [`Event`]
//! with the stable type name `AccountOpened` and schema version 1.
//!
//! ## The pieces
//!
//! - [`Aggregate`] and [`AggregateType`]: the write model. Derived, or written by hand.
//! - [`Event`]: stable type names, schema versions, JSON payloads, upcasting.
//! - [`EventEnvelope`] and [`Metadata`]: an event with its ids, positions, timestamp,
//!   correlation and causation.
//! - [`EventStore`]: load, append with an expected version, read a stream, read all.
//!   [`InMemoryEventStore`] here; `thalo-postgres` for production.
//! - [`Repository`]: load -> handle -> append, retrying on conflicts; with
//!   [`Repository::with_cache`], aggregates it has seen stay in memory and a command
//!   costs one append (the store's version check still guards every command);
//!   [`Repository::execute_once`] runs a command at most once per [`CommandId`]
//!   (idempotency key), so a client or a process manager may retry safely.
//! - [`EventHandler`], [`Projection`] and [`Subscription`]: the read side, in process;
//!   `thalo-kafka` runs the same handlers from Kafka.
//! - [`EventSet`] and [`event_set!`]: one event enum over several aggregate types, for
//!   views across aggregates (multi-stream projections); [`Subscription::new_set`]
//!   feeds it in the store's global order.
//! - [`ProcessManager`], [`Action`] and [`ProcessRunner`]: process managers (sagas)
//!   that react to the events of several aggregates with commands, executed exactly
//!   once under keys derived from the causing event, and timers; in memory here,
//!   durably with `thalo_postgres::PgProcessManager`, tested with
//!   `thalo_testing::ProcessManagerTest`. Their `react` must be deterministic: a crash
//!   before the state is saved replays the event, and the same commands under the same
//!   keys are replayed by the store, not executed again.
//!
//! ## Consistency
//!
//! An aggregate is the consistency boundary. Appends carry the version the command was
//! decided on; if another writer appended in between, the store rejects the append with
//! [`Error::Conflict`] and [`Repository::execute`] decides the command again on the new
//! state. No event is ever written on the basis of stale state, and no update is lost.
//!
//! Sequences start at 1 for each aggregate and have no gaps; an aggregate's version is
//! the sequence of its last event (0 before the first).
//!
//! ## Errors of your own
//!
//! A command returns [`Error`] (with [`Error::invariant`] codes), or the application's
//! own error type: any `std::error::Error + Send + Sync + 'static` works as is (see
//! [`CommandError`]), and reaches the caller as [`Error::Domain`], to be downcast with
//! [`Error::downcast_domain`]. Derive [`ErrorCode`] for it, and each rejection carries a
//! stable code as well ([`Error::code`]), as invariants do:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use thalo::{commands, events, Aggregate, ErrorCode, InMemoryEventStore, Repository};
//!
//! #[derive(Debug, PartialEq, thiserror::Error, ErrorCode)]
//! pub enum LoanError {
//!     /// Code `MEMBER_SUSPENDED`, the variant's name would give `SUSPENDED`.
//!     #[error("the member is suspended")]
//!     #[code("MEMBER_SUSPENDED")]
//!     Suspended,
//! }
//!
//! #[derive(Aggregate, Clone, Debug, Default)]
//! pub struct Member {
//!     #[identity]
//!     id: String,
//!     suspended: bool,
//!     books: Vec<String>,
//! }
//!
//! #[commands]
//! impl Member {
//!     pub fn suspend(&self) -> Result<SuspendedEvent, LoanError> {
//!         Ok(SuspendedEvent {})
//!     }
//!
//!     pub fn borrow(&self, book: String) -> Result<BorrowedEvent, LoanError> {
//!         if self.suspended {
//!             return Err(LoanError::Suspended);
//!         }
//!         Ok(BorrowedEvent { book })
//!     }
//! }
//!
//! #[events]
//! impl Member {
//!     pub fn suspended(&mut self) {
//!         self.suspended = true;
//!     }
//!
//!     pub fn borrowed(&mut self, book: String) {
//!         self.books.push(book);
//!     }
//! }
//!
//! let repo = Repository::new(InMemoryEventStore::new());
//! let id = "m-1".to_owned();
//! repo.execute::<Member>(&id, MemberCommand::Suspend).await?;
//! let err = repo
//!     .execute::<Member>(&id, MemberCommand::Borrow { book: "Dune".into() })
//!     .await
//!     .unwrap_err();
//! assert_eq!(err.code(), Some("MEMBER_SUSPENDED"));
//! assert_eq!(err.downcast_domain::<LoanError>(), Some(&LoanError::Suspended));
//! # Ok::<(), thalo::Error>(())
//! # }).unwrap();
//! ```
//!
//! Projections and handlers turn a driver's error into an [`Error`] with context with
//! [`ResultExt`]: `.store_err("updating balances")?`.
//!
//! ## Commands validate, `apply` never fails
//!
//! A command method is where input is checked: amounts, lengths, character sets,
//! arithmetic that could overflow (`checked_add`, then an [`Error::invariant`] with its
//! own code). An event that was stored is a fact, and `apply` runs for every stored
//! event on every load, so an `#[events]` method must be *total*: it must accept any
//! event the aggregate has ever stored without panicking (use saturating arithmetic
//! where a hand-made stream could overflow). A panic in `apply` makes the aggregate
//! unloadable for good; a rejected command stores nothing. Check it with
//! `thalo_testing::assert_apply_is_total` (feature `proptest`), which replays generated
//! event sequences.
//!
//! ## Delivery
//!
//! Handlers see each aggregate's events in order, at least once. Projections that keep
//! their read model in Postgres get exactly-once effects from `thalo-postgres`, which
//! stores the checkpoint in the same transaction as the read-model change.
//!
//! ## Traces
//!
//! [`Repository::execute`] and its variants run in an `execute` span (INFO; fields
//! `aggregate_type`, `aggregate_id`, `attempt`, `outcome`). Events carry the
//! [W3C Trace Context](https://www.w3.org/TR/trace-context/) of the request that caused
//! them in their metadata ([`Metadata::with_traceparent`],
//! [`Metadata::with_tracestate`]); `thalo-kafka` sends it along as the Kafka headers
//! `traceparent` and `tracestate`, and its consumers continue the trace from it.
//! Set it yourself from the incoming request, or enable the `opentelemetry` feature:
//! then, with `tracing-opentelemetry`'s layer installed, a command whose metadata has
//! no `traceparent` gets its `execute` span's context (the child of the caller's span,
//! e.g. the HTTP request's).
//!
//! ## Metrics
//!
//! Thalo records metrics through the [`metrics`](https://docs.rs/metrics) facade and
//! installs nothing: the application installs the exporter it wants (Prometheus,
//! StatsD, ...) as the process's recorder. A facade rather than OpenTelemetry metrics,
//! because any exporter plugs into it, it costs next to nothing without a recorder
//! (every call is a no-op), and OpenTelemetry is still reachable through a
//! `metrics` -> OpenTelemetry bridge recorder. Install the recorder before starting the
//! relay and the consumers: they register their metrics when they start. The bank
//! example serves them on `GET /metrics` with `metrics-exporter-prometheus`.
//!
//! Names are prefixed `thalo_` and carry their unit (`_seconds`, `_total`); labels are
//! low-cardinality only (aggregate type, outcome, projection, consumer group, topic,
//! partition), never an aggregate id. The counters follow the per-command and
//! per-message paths without building labels there: label values are static strings,
//! or registered once per relay topic and per consumer.
//!
//! | metric | type | labels | recorded by | what it counts |
//! |---|---|---|---|---|
//! | `thalo_commands_total` | counter | `aggregate_type`, `outcome` | [`Repository`] | commands (`execute*`), by outcome: `stored` (also a command that decided no events), `replayed` (a retry under a used [`CommandId`]), `rejected` (invariant or domain error, also a replayed rejection), `conflict_exhausted` (still conflicting after the last attempt), `error` (anything else) |
//! | `thalo_command_duration_seconds` | histogram | `aggregate_type` | [`Repository`] | time of one command, retries included |
//! | `thalo_command_conflicts_total` | counter | `aggregate_type` | [`Repository`] | optimistic-concurrency conflicts that were retried |
//! | `thalo_cache_hits_total` | counter | `aggregate_type` | [`Repository::with_cache`] | attempts that appended from a cached aggregate (as [`CacheStats::hits`]) |
//! | `thalo_cache_misses_total` | counter | `aggregate_type` | [`Repository::with_cache`] | attempts that loaded the aggregate (as [`CacheStats::misses`]) |
//! | `thalo_projection_position` | gauge | `projection` | [`Subscription`], `PgSubscription` | the checkpoint (global position) after the last batch |
//! | `thalo_projection_lag_events` | gauge | `projection` | [`Subscription`], `PgSubscription` | events known to wait: 0 when the last batch reached the end of the log, the batch size (a lower bound) while catching up |
//! | `thalo_projection_lag_seconds` | gauge | `projection` | [`Subscription`], `PgSubscription` | how far behind in time: 0 when the last batch reached the end of the log, the age of the last event handled while catching up |
//! | `thalo_appends_total` | counter | `aggregate_type` | `PgEventStore` | appends that stored events (plain, keyed, in a transaction, group-committed) |
//! | `thalo_append_events_total` | counter | `aggregate_type` | `PgEventStore` | events stored |
//! | `thalo_group_commit_batch_size` | histogram | | `PgEventStore` with group commit | appends per group-commit batch |
//! | `thalo_outbox_depth` | gauge | | `KafkaRelay` (leader) | outbox rows waiting, measured every `with_lag_log_interval` |
//! | `thalo_outbox_oldest_age_seconds` | gauge | | `KafkaRelay` (leader) | age of the oldest waiting row (0 when none) |
//! | `thalo_relay_parked_aggregates` | gauge | | `KafkaRelay` (leader) | aggregates parked in the outbox |
//! | `thalo_relay_is_leader` | gauge | | `KafkaRelay` | 1 while this process's relay leads the outbox, else 0 |
//! | `thalo_relay_published_total` | counter | `topic` | `KafkaRelay` | messages Kafka acknowledged |
//! | `thalo_relay_failed_total` | counter | | `KafkaRelay` | messages Kafka did not acknowledge (kept in the outbox, retried or parked) |
//! | `thalo_consumer_handled_total` | counter | `consumer`, `outcome` | `KafkaConsumer` | messages by outcome: `applied`, `duplicate` (already applied: dropped or skipped), `parked` (not applied because its stream is parked: the message that parked it and those held behind it), `dead_lettered` (undecodable, written to the dead-letter topic with no stream to park), and `failed`, which counts failed handler attempts (retried, or the stream parked) |
//! | `thalo_consumer_handle_duration_seconds` | histogram | `consumer` | `KafkaConsumer` | time of one handler call (a projection's batch is one call) |
//! | `thalo_consumer_lag` | gauge | `consumer`, `topic`, `partition` | `KafkaConsumer` | high watermark minus the consumer's position, per assigned partition, from librdkafka's statistics (every second, no extra requests) |
//! | `thalo_dead_letters_total` | counter | `consumer` | `KafkaConsumer` | messages written to the dead-letter topic |
//!
//! `consumer` is the consumer's group id.
//!
//! ## Feature flags
//!
//! - `macros` (default): re-exports `#[derive(Aggregate)]`, `#[commands]`,
//!   `#[events]` and `#[derive(ErrorCode)]` from `thalo-macros`.
//! - `opentelemetry`: [`Repository::execute`] and its variants fill
//!   [`Metadata::traceparent`] (and `tracestate`) from the OpenTelemetry context of
//!   their `execute` span when the caller did not set one (pulls in `opentelemetry` and
//!   `tracing-opentelemetry`).
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod aggregate;
mod any_event;
mod cache;
mod command;
mod envelope;
mod error;
mod event;
mod event_set;
mod handler;
mod instruments;
mod memory;
mod process;
mod process_runner;
mod progress;
mod repository;
mod shutdown;
mod store;
mod subscription;
mod trace;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use aggregate::{Aggregate, AggregateType};
pub use any_event::AnyEvent;
pub use cache::CacheStats;
pub use command::{
    CommandId, CommandKey, Once, Recorded, Rejection, ReplayedRejection, DEFAULT_COMMAND_RETENTION,
};
pub use envelope::{EventEnvelope, Metadata, RawEvent};
pub use error::{BoxError, CommandError, Error, ErrorCode, Result, ResultExt};
pub use event::{Event, EventSet};
pub use handler::{EventHandler, Projection};
pub use memory::InMemoryEventStore;
pub use process::{Action, Command, ProcessManager};
pub use process_runner::ProcessRunner;
pub use progress::{Progress, ProgressReport};
pub use repository::Repository;
pub use shutdown::Shutdown;
pub use store::{CheckpointStore, Decided, EventStore, Loaded};
pub use subscription::Subscription;

/// The `uuid` version in Thalo's API (`Metadata`'s correlation and causation ids), for
/// building those ids without a dependency of your own.
pub use uuid;

#[cfg(feature = "macros")]
pub use thalo_macros::{commands, events, Aggregate, ErrorCode};
