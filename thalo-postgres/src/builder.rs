//! Configuring a [`PgEventStore`].

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use thalo::{AggregateType, Error};

use crate::group::GroupState;
use crate::notify::{Announcer, Notifier};
use crate::sql::Sql;
use crate::store::Inner;
use crate::{GroupCommit, NotifyMode, PgEventStore, SchemaName, SnapshotPolicy};

/// Builds a [`PgEventStore`] with a non-default configuration.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), thalo::Error> {
/// use std::time::Duration;
/// use thalo_postgres::{NotifyMode, PgEventStore};
///
/// let store = PgEventStore::builder(pool)
///     .schema("billing")
///     .snapshot_every_type("invoice", 200)
///     .notify(true)
///     .horizon_wait(Duration::from_secs(2))
///     .build()?;
/// store.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PgEventStoreBuilder {
    pool: PgPool,
    schema: String,
    snapshots: SnapshotPolicy,
    notify: NotifyMode,
    notify_interval: Duration,
    horizon_wait: Duration,
    poll_interval: Duration,
    max_event_bytes: usize,
    command_retention: Duration,
    outbox: bool,
    group_commit: Option<GroupCommit>,
}

impl PgEventStoreBuilder {
    /// The default of [`notify_interval`](PgEventStoreBuilder::notify_interval).
    pub const DEFAULT_NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

    /// The default of [`max_event_bytes`](PgEventStoreBuilder::max_event_bytes): 900 kB,
    /// below Kafka's default message size limit (1 MB for the producer's
    /// `message.max.bytes`, about as much for the broker), with room for the key and the
    /// headers the relay adds.
    pub const DEFAULT_MAX_EVENT_BYTES: usize = 900_000;

    /// The largest event an append accepts, in bytes of its JSON payload plus its
    /// metadata (default [`DEFAULT_MAX_EVENT_BYTES`](Self::DEFAULT_MAX_EVENT_BYTES)).
    /// An append with a larger event fails with [`Error::EventTooLarge`] and stores
    /// nothing, instead of storing an event that Kafka will refuse to carry (the relay
    /// would park its aggregate). Raise it together with the topic's `max.message.bytes`
    /// and the relay's `message.max.bytes`; `usize::MAX` turns the check off.
    ///
    /// ```
    /// # fn example(pool: sqlx::PgPool) -> Result<(), thalo::Error> {
    /// let store = thalo_postgres::PgEventStore::builder(pool)
    ///     .max_event_bytes(4 * 1024 * 1024)
    ///     .build()?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_event_bytes(mut self, limit: usize) -> Self {
        self.max_event_bytes = limit;
        self
    }

    /// How long the keys of idempotent commands
    /// ([`Repository::execute_once`](thalo::Repository::execute_once)) are remembered
    /// (default [`thalo::DEFAULT_COMMAND_RETENTION`], 7 days). A retry within it is
    /// recognised; after it, the key is forgotten and a retry executes the command
    /// again. Keep it longer than any client retries, and than any replay of events
    /// that issue commands. Expired keys are ignored at once and deleted by
    /// [`PgEventStore::prune_commands`](crate::PgEventStore::prune_commands).
    ///
    /// ```
    /// # fn example(pool: sqlx::PgPool) -> Result<(), thalo::Error> {
    /// use std::time::Duration;
    ///
    /// let store = thalo_postgres::PgEventStore::builder(pool)
    ///     .command_retention(Duration::from_secs(24 * 60 * 60))
    ///     .build()?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn command_retention(mut self, retention: Duration) -> Self {
        self.command_retention = retention;
        self
    }

    /// Whether appends write outbox rows (default `true`). Turn it off for a
    /// Postgres-only deployment, where no relay publishes to Kafka and read models are
    /// fed in process (`PgSubscription`, `PgProjection`): with it on and no relay, the
    /// outbox grows by a row per event, forever. Every writer of a schema must agree; a
    /// `KafkaRelay` built from a store without an outbox refuses to run. Turning it off
    /// later leaves the rows already written; turning it on later publishes only events
    /// appended from then on (republish older ones explicitly).
    ///
    /// ```
    /// # fn example(pool: sqlx::PgPool) -> Result<(), thalo::Error> {
    /// let store = thalo_postgres::PgEventStore::builder(pool).outbox(false).build()?;
    /// assert!(!store.has_outbox());
    /// # Ok(())
    /// # }
    /// ```
    pub fn outbox(mut self, enabled: bool) -> Self {
        self.outbox = enabled;
        self
    }

    pub(crate) fn new(pool: PgPool) -> Self {
        PgEventStoreBuilder {
            pool,
            schema: SchemaName::DEFAULT.to_owned(),
            snapshots: SnapshotPolicy::never(),
            notify: NotifyMode::AfterCommit,
            notify_interval: Self::DEFAULT_NOTIFY_INTERVAL,
            horizon_wait: Duration::from_secs(5),
            poll_interval: Duration::from_millis(250),
            max_event_bytes: Self::DEFAULT_MAX_EVENT_BYTES,
            command_retention: thalo::DEFAULT_COMMAND_RETENTION,
            outbox: true,
            group_commit: None,
        }
    }

    /// The Postgres schema of the store's tables (default `thalo`). It must match
    /// `^[a-z_][a-z0-9_]{0,62}$`, not start with `pg_`, and, with notify on, be at most 56
    /// characters so that the channel `<schema>_events` fits Postgres' 63-byte limit.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Replaces the whole snapshot policy.
    pub fn snapshots(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = policy;
        self
    }

    /// Snapshots of aggregate `A` every `n` events (0: never).
    pub fn snapshot_every<A: AggregateType>(mut self, n: u64) -> Self {
        self.snapshots = self.snapshots.with::<A>(n);
        self
    }

    /// Snapshots of the aggregate type named `aggregate_type` every `n` events (0: never).
    pub fn snapshot_every_type(mut self, aggregate_type: impl Into<String>, n: u64) -> Self {
        self.snapshots = self.snapshots.with_type(aggregate_type, n);
        self
    }

    /// Whether appends `NOTIFY` the channel `<schema>_events` with their last position:
    /// `true` for [`NotifyMode::AfterCommit`] (the default), `false` for
    /// [`NotifyMode::Off`]. Subscriptions and the outbox relay `LISTEN` on it and fall
    /// back to polling without it. See [`NotifyMode`] for the choices and their costs.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = if notify {
            NotifyMode::AfterCommit
        } else {
            NotifyMode::Off
        };
        self
    }

    /// How appends notify; see [`NotifyMode`].
    pub fn notify_mode(mut self, mode: NotifyMode) -> Self {
        self.notify = mode;
        self
    }

    /// With [`NotifyMode::AfterCommit`], the shortest time between two notifications
    /// (default 5 ms; zero: one `NOTIFY` after another). An append after a quiet spell
    /// is announced at once; under a steady stream of appends, listeners are woken once
    /// per interval for all of them, so they may see an event up to this much later,
    /// and the store sends at most one `NOTIFY` (one small transaction) per interval
    /// instead of about one per append.
    pub fn notify_interval(mut self, interval: Duration) -> Self {
        self.notify_interval = interval;
        self
    }

    /// How long [`read_all`](thalo::EventStore::read_all) waits for an older running
    /// transaction to finish when everything it could return is held back behind it
    /// (default 5 s). See the crate docs on global order.
    pub fn horizon_wait(mut self, wait: Duration) -> Self {
        self.horizon_wait = wait;
        self
    }

    /// How often [`wait_for_events`](thalo::EventStore::wait_for_events) polls when it
    /// cannot listen for notifications (default 250 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Turns on group commit (off by default): [`append`](thalo::EventStore::append)
    /// encodes its events in the caller's task and queues them for one background
    /// committer, which writes all appends queued at that moment (up to
    /// [`GroupCommit::with_max_batch`]) with one statement in one transaction and one commit.
    /// [`PgEventStore::append_in`] is never batched.
    ///
    /// **When:** many concurrent writers whose throughput is bound by the commit rate
    /// (one WAL flush per transaction). Batching turns N commits into one.
    ///
    /// **Cost:** each append waits until its batch is written and committed: roughly one
    /// to two commit latencies, plus a hop between tasks. With few clients it is slower
    /// than one transaction per append. The committer writes up to
    /// [`GroupCommit::with_max_in_flight`] batches at once (streams never shared between
    /// them), each on a connection of the store's pool, so size the pool for it.
    ///
    /// **Guarantees** (the same as without it):
    ///
    /// - expected versions are checked per aggregate: a batch holds at most one append per
    ///   stream, and a stale append inserts nothing and fails with its own
    ///   [`Error::Conflict`] (with the actual version) while the rest of the batch is
    ///   stored;
    /// - each caller gets its own envelopes or its own error;
    /// - nothing is acknowledged before the batch committed; an append the server
    ///   rejects (a payload `jsonb` refuses, say) fails only its own caller, the others
    ///   are appended on their own; only when the outcome is unknown (the connection was
    ///   lost) does every caller of the batch get the error;
    /// - a writer outside the batch (another process, `append_in`) that races one of its
    ///   streams makes the batch fall back to appending each request on its own, so the
    ///   conflict still reaches only that stream's caller;
    /// - notifications follow the store's [`NotifyMode`], once per batch.
    ///
    /// The committer is spawned on the Tokio runtime of the first append and ends when the
    /// last handle of the store is dropped; appends after that runtime shut down fail
    /// with [`Error::Store`].
    ///
    /// ```no_run
    /// # async fn example(pool: sqlx::PgPool) -> Result<(), thalo::Error> {
    /// use thalo_postgres::{GroupCommit, PgEventStore};
    ///
    /// let store = PgEventStore::builder(pool)
    ///     .group_commit(GroupCommit::default().with_max_batch(256))
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn group_commit(mut self, config: GroupCommit) -> Self {
        self.group_commit = Some(config);
        self
    }

    /// Builds the store. Does not touch the database; call
    /// [`PgEventStore::migrate`] to create or update the schema.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Config`] for an invalid schema name.
    pub fn build(self) -> Result<PgEventStore, Error> {
        let schema = SchemaName::new(self.schema.as_str())?;
        let channel = schema.channel();
        if self.notify.is_on() && channel.len() > 63 {
            return Err(Error::config(format!(
                "schema name `{schema}` is too long for the notification channel `{channel}` \
                 (63 bytes at most): use at most 56 characters or turn notify off"
            )));
        }
        Ok(self.assemble(schema))
    }

    /// Builds the store around an already validated schema name.
    pub(crate) fn assemble(self, schema: SchemaName) -> PgEventStore {
        let channel = schema.channel();
        let sql = Sql::new(&schema, self.outbox);
        PgEventStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                sql,
                parking: crate::parking::ParkingSql::new(&schema),
                schema,
                channel,
                snapshots: self.snapshots,
                notify: self.notify,
                horizon_wait: self.horizon_wait,
                poll_interval: self.poll_interval,
                max_event_bytes: self.max_event_bytes,
                command_retention: self.command_retention,
                outbox: self.outbox,
                notifier: Notifier::default(),
                announcer: Announcer::new(self.notify_interval),
                group: self.group_commit.map(GroupState::new),
            }),
        }
    }
}
