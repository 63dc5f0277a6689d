//! # thalo-postgres
//!
//! A PostgreSQL event store for [Thalo](thalo): events, a transactional outbox,
//! snapshots, checkpoints and projections with exactly-once effects, on
//! [sqlx](https://docs.rs/sqlx).
//!
//! ```no_run
//! use thalo::{commands, events, Aggregate, Error, EventStore, Repository};
//! use thalo_postgres::PgEventStore;
//!
//! #[derive(Aggregate, Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
//! #[aggregate(snapshot)]
//! pub struct BankAccount {
//!     #[identity]
//!     account_number: String,
//!     balance_cents: i64,
//!     opened: bool,
//! }
//!
//! #[commands]
//! impl BankAccount {
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
//!     pub fn account_opened(&mut self, initial_cents: i64) {
//!         self.balance_cents = initial_cents;
//!         self.opened = true;
//!     }
//! }
//!
//! # async fn run() -> Result<(), Error> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/bank")
//!     .await
//!     .map_err(|e| Error::store("connecting", e))?;
//! let store = PgEventStore::builder(pool)
//!     .schema("bank")                              // default: `thalo`
//!     .snapshot_every::<BankAccount>(100)          // default: no snapshots
//!     .build()?;
//! store.migrate().await?;                          // explicit, idempotent
//!
//! let repo = Repository::new(store.clone());
//! let id = "acc-1".to_string();
//! let stored = repo
//!     .execute::<BankAccount>(&id, BankAccountCommand::OpenAccount { initial_cents: 10_00 })
//!     .await?;
//! assert_eq!(stored[0].sequence, 1);
//!
//! // Everything, in global order, from the start:
//! let all = store.read_all(0, 100).await?;
//! # let _ = all;
//! # Ok(())
//! # }
//! ```
//!
//! ## Tables
//!
//! [`PgEventStore::migrate`] creates, in the store's schema (default `thalo`, see
//! [`SchemaName`]): `events` (one row per event, unique
//! `(aggregate_type, aggregate_id, sequence)`), `outbox` (one row per event, for the
//! Kafka relay), `snapshots`, `checkpoints` (a position per named reader) and
//! `stream_checkpoints` (a sequence per projection and stream, and whether the stream is
//! parked), and for the pipeline's edges `outbox_leader` (the relay leader's epoch),
//! `outbox_parked` (aggregates the relay holds back), `consumer_parked` (streams a
//! consumer holds back) and `parking_log` (every park, retry, re-drive and skip); for
//! idempotent commands `commands`; `projection_versions` (which version of each
//! projection is live); and for process managers ([`PgProcessManager`])
//! `process_states` (each instance's JSON state, and whether it completed),
//! `process_timers` (pending timers, a row each) and `process_timer_firings` (a row per
//! fired timer, which grows until [`PgProcessManager::prune_timer_firings`] prunes it).
//! Parking
//! is two tables rather than one because the relay parks an aggregate for everyone and
//! a consumer parks a stream for itself. The SQL is in `migrations/`; sqlx's
//! `_sqlx_migrations` lives in the same schema.
//!
//! ## Consistency
//!
//! An append is one SQL statement: it checks that the stream is at the expected version,
//! inserts all events (one multi-row insert), inserts their outbox rows, and notifies
//! `<schema>_events`, atomically. Two guards make optimistic concurrency exact:
//!
//! - the statement inserts nothing unless the stream's current version equals the
//!   expected one (so appending at a version past the end conflicts too), and
//! - the unique constraint `events_stream_sequence` rejects the second of two concurrent
//!   appends that both saw the same version.
//!
//! Both are reported as [`thalo::Error::Conflict`], the second with the sqlx error as its
//! source; [`thalo::Repository`] reloads and retries. [`PgEventStore::append_in`] runs the
//! same statement inside your transaction, so a read model in the same database can
//! change atomically with the events.
//!
//! ## Global order
//!
//! [`read_all`](thalo::EventStore::read_all) returns events in the order
//! `(transaction_id, position)`, and only those written by transactions older than every
//! transaction still running (`pg_snapshot_xmin(pg_current_snapshot())`). A plain
//! `position > cursor` read would skip an event whose transaction took its position
//! early but committed late; the horizon makes that impossible: nothing can ever commit
//! behind a reader's cursor. The cursor is still a `u64` position. The cost is that a
//! long-running write transaction anywhere in the cluster delays readers (not writers)
//! until it ends; keep write transactions short. See `global.rs` for the details.
//!
//! ## Snapshots
//!
//! Per aggregate type, with a [`SnapshotPolicy`] (every N events): loading replays at
//! most about N events after the latest snapshot and writes a new snapshot when it had to
//! replay N or more. A snapshot that no longer decodes is ignored with a warning (full
//! replay, then a fresh snapshot). The aggregate must support snapshots
//! (`#[aggregate(snapshot)]`).
//!
//! ## Delivery to the read side
//!
//! - [`thalo::Subscription`] works with this store as with any other (at least once).
//! - [`PgSubscription`] runs a [`PgProjection`] whose read model lives in the same
//!   database with exactly-once effects: each batch's read-model changes and the
//!   projection's checkpoints commit in one transaction.
//! - [`PgEventStore::apply_exactly_once`] is the same protocol for events that arrive
//!   another way (a Kafka consumer's batch): duplicates and redeliveries are skipped by
//!   a per-stream sequence stored in the same transaction as the change.
//! - A projection's [version](PgProjection::version) is rebuilt without downtime beside
//!   the live one and takes over once caught up ([`ReadModelTable`],
//!   [`PgSubscription::with_read_model`], [`PgEventStore::promote`]).
//!
//! ## Notifications
//!
//! With notify on (the default, [`NotifyMode::AfterCommit`]), every committed append
//! has a background task of the store `NOTIFY '<schema>_events'` with its last position
//! (concurrent appends share one notification, and no append waits for it);
//! [`wait_for_events`], [`PgSubscription`] and the outbox relay `LISTEN` on it and fall
//! back to polling. [`NotifyMode::InTransaction`] runs `pg_notify` inside the append's
//! transaction instead, so the notification goes out exactly when the events commit;
//! but Postgres serialises the commits of notifying transactions (a database-wide lock
//! held until the commit is durable), which caps concurrent appends at about one commit
//! per WAL flush. [`NotifyMode::Off`] does not notify. The benchmark
//! (`benches/store.rs`) measures the three.
//!
//! ## Group commit
//!
//! With one transaction per append, many concurrent writers are capped by the commit rate
//! (one WAL flush each, and notifying commits are serialised, see above).
//! [`PgEventStoreBuilder::group_commit`] (off by default) hands every
//! [`append`](thalo::EventStore::append) to one background committer, which writes all
//! appends queued at that moment, across streams, with one statement and one commit,
//! and keeps up to [`GroupCommit::with_max_in_flight`] such batches (on distinct streams) in
//! flight at once.
//!
//! - **Use it** for many concurrent writers whose throughput is bound by commits.
//! - **Cost:** each append waits for the batch in flight and then for its own (roughly
//!   one to two commit latencies); with few clients it is slower than plain appends.
//! - **Guarantees:** expected versions are checked per aggregate (at most one append per
//!   stream in a batch; a stale one fails alone with [`thalo::Error::Conflict`] and its
//!   actual version, the rest of the batch is stored); each caller gets its own
//!   envelopes or error; nothing is acknowledged before the commit. An append the
//!   server rejects (a payload `jsonb` refuses, say) fails only its own caller, and the
//!   rest of the batch is stored; only an unknown outcome, such as a connection lost
//!   while the batch may have committed, fails every caller of the batch. A writer
//!   outside the batch that races one of its streams (another process,
//!   [`PgEventStore::append_in`], which is never batched) makes the batch fall back to
//!   one append per request. See `group.rs`.
//!
//! ## Outbox, parking and re-drive
//!
//! A publisher (the Kafka relay, or any other) takes the outbox through [`PgOutbox`]
//! ([`PgEventStore::outbox`]): one leader at a time, fenced by an epoch that grows with
//! every claim; rows fetched in outbox order and deleted once acknowledged, only while
//! the leader's epoch is current. An aggregate whose event the broker refuses for good
//! is parked: its rows wait, in order, while every other aggregate goes on, until an
//! operator retries or skips it ([`PgOutbox::retry`], [`PgOutbox::skip`]).
//!
//! **Without a relay**, turn the outbox off ([`PgEventStoreBuilder::outbox`]`(false)`):
//! in a Postgres-only deployment, where read models are fed in process by
//! [`PgSubscription`] and [`PgProjection`] from the global log, nothing deletes outbox
//! rows and the table would grow by a row per event forever. Keep it on as soon as
//! anything publishes the events (a `KafkaRelay` refuses a store without one).
//!
//! ## Idempotent commands
//!
//! [`EventStore::append_once`](thalo::EventStore::append_once) records the command's key
//! in the `commands` table in the append's own statement (primary key on the key), so
//! events and key commit together and a racing duplicate stores nothing; a rejection
//! is recorded too (`record_command`). Keys are kept for
//! [`PgEventStoreBuilder::command_retention`] (7 days by default) and deleted by
//! [`PgEventStore::prune_commands`].
//!
//! Consumers have sequenced dead letters: a projection or handler that gives up on an
//! event of a stream, or finds a gap in it, parks the stream ([`ParkedStream`]) and holds
//! its later events instead of applying past it. [`PgEventStore::redrive_projection`]
//! applies the stream's events from the store, in order and exactly once, and releases
//! it; [`PgEventStore::redrive_handler`] does the same for a plain event handler, and
//! [`PgEventStore::skip_parked`] skips an event on an operator's decision. Every park,
//! retry, re-drive and skip is recorded in `parking_log` (tables in
//! `migrations/0002_edges.sql`). [`PgEventStoreBuilder::max_event_bytes`] refuses, at
//! append time, events too large for the broker to carry.
//!
//! ## Process managers and durable timers
//!
//! [`PgProcessManager`] runs a [`thalo::ProcessManager`] over the global log: for each
//! event, the instance's saved state, `react`, the commands through a
//! [`Repository`](thalo::Repository) under keys derived from the event, then the new
//! state, the timer changes and the checkpoint in one transaction. A crash before that
//! commit replays the event with the same keys, so each command is applied once. Timers
//! are rows of `process_timers`: they survive restarts, fire once (firing is serialized
//! per process manager by an advisory lock, and its commands are keyed by the timer's
//! id), a cancelled or replaced timer's row is gone, also when an earlier timer of the
//! same batch cancelled it, and each firing is recorded once in
//! `process_timer_firings`, in the transaction that deletes the timer
//! ([`PgProcessManager::timer_firings`]; `tests/process.rs`).
//!
//! ## Moving a store to another cluster
//!
//! Each event row records the id of the transaction that wrote it, which orders
//! [`read_all`](thalo::EventStore::read_all). A dump restored into another cluster keeps
//! the old cluster's ids; when they are ahead of the new cluster's counter, readers go
//! quiet. [`PgEventStore::migrate`] detects this and fails with
//! [`thalo::Error::Config`]; stop the writers and call
//! [`PgEventStore::rebase_transaction_ids`] once, before anything appends in the new
//! cluster.
//!
//! ## Performance
//!
//! An append is one round trip; a load is one (two with a snapshot policy). sqlx's pool
//! pings every connection it hands out by default (`test_before_acquire`), which adds a
//! round trip to every store call; `PgPoolOptions::test_before_acquire(false)` removes
//! it, at the price of an error (instead of a reconnect) when a connection died while
//! idle.
//!
//! [`wait_for_events`]: thalo::EventStore::wait_for_events
//!
//! ## Limits
//!
//! Payloads and metadata are stored as `jsonb`: key order and whitespace are not kept
//! (events decode the same), and strings must not contain `\u0000`. Event schema versions
//! must fit a `SMALLINT` (up to 32767).
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod append;
mod builder;
mod checkpoint;
mod command;
mod error;
mod global;
mod group;
mod load;
mod notify;
mod outbox;
mod parking;
mod process;
mod projection;
mod rebase;
mod row;
mod schema;
mod snapshot;
mod sql;
mod store;
mod subscription;
mod versions;
mod wait;

pub use builder::PgEventStoreBuilder;
pub use error::database_outage;
pub use group::GroupCommit;
pub use notify::NotifyMode;
pub use outbox::{
    OutboxEntry, OutboxLag, OutboxLeader, OutboxLeaderInfo, OutboxWaiter, ParkedAggregate,
    PgOutbox, SkippedEvent,
};
pub use parking::{ParkedStream, Redriven};
pub use process::{PgProcessManager, ProcessInstance, TimerFiring};
pub use projection::{Applied, PgProjection};
pub use schema::{SchemaName, SchemaNameError};
pub use snapshot::SnapshotPolicy;
pub use store::PgEventStore;
pub use subscription::PgSubscription;
pub use versions::{checkpoint_key, ProjectionVersion, ReadModelTable, VersionState};

/// The sqlx this crate is built with, so that projections and callers of
/// [`PgEventStore::append_in`] use the same types.
pub use sqlx;
