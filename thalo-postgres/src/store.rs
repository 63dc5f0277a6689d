//! The Postgres event store.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use thalo::{
    Aggregate, CommandKey, Decided, Error, EventEnvelope, EventStore, Loaded, Metadata, Once,
    RawEvent, Recorded, Rejection,
};

use crate::error::store;
use crate::group::{self, GroupState};
use crate::notify::{self, Announcer, Notifier};
use crate::sql::Sql;
use crate::{global, GroupCommit, NotifyMode, PgEventStoreBuilder, SchemaName, SnapshotPolicy};

/// A Thalo [`EventStore`] and [`CheckpointStore`](thalo::CheckpointStore) in PostgreSQL.
///
/// Cloning is cheap and gives another handle to the same store (and pool).
///
/// - [`append`](EventStore::append) writes the events and one outbox row per event in a
///   single statement (one round trip, atomic), notifies `<schema>_events`, and reports a
///   stale expected version as [`Error::Conflict`].
/// - [`append_in`](PgEventStore::append_in) does the same inside the caller's
///   transaction, so a same-database read model commits atomically with the events.
/// - With [group commit](PgEventStoreBuilder::group_commit) on, `append` hands its
///   encoded events to a background committer that writes the appends of many tasks in
///   one statement and one commit (`append_in` is never batched).
/// - [`load`](EventStore::load) starts from a snapshot when the
///   [`SnapshotPolicy`] asks for them.
/// - [`read_all`](EventStore::read_all) follows the global order without ever skipping
///   an event that commits late (see the crate docs).
///
/// See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct PgEventStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) sql: Sql,
    pub(crate) parking: crate::parking::ParkingSql,
    pub(crate) schema: SchemaName,
    pub(crate) channel: String,
    pub(crate) snapshots: SnapshotPolicy,
    pub(crate) notify: NotifyMode,
    pub(crate) horizon_wait: Duration,
    pub(crate) poll_interval: Duration,
    /// The largest event (payload and metadata, in bytes) an append accepts.
    pub(crate) max_event_bytes: usize,
    /// How long command keys are remembered.
    pub(crate) command_retention: Duration,
    /// Whether appends write outbox rows.
    pub(crate) outbox: bool,
    pub(crate) notifier: Notifier,
    /// Sends the notifications of [`NotifyMode::AfterCommit`].
    pub(crate) announcer: Announcer,
    /// Set when appends go through the group committer.
    pub(crate) group: Option<GroupState>,
}

impl fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgEventStore")
            .field("schema", &self.inner.schema.as_str())
            .field("notify", &self.inner.notify)
            .field("snapshots", &self.inner.snapshots)
            .field("horizon_wait", &self.inner.horizon_wait)
            .field("group_commit", &self.group_commit())
            .finish_non_exhaustive()
    }
}

impl PgEventStore {
    /// A store in the default schema `thalo`, with notify on and no snapshots.
    pub fn new(pool: PgPool) -> Self {
        PgEventStoreBuilder::new(pool).assemble(SchemaName::default())
    }

    /// A builder for a store with another schema, snapshots or notify off.
    pub fn builder(pool: PgPool) -> PgEventStoreBuilder {
        PgEventStoreBuilder::new(pool)
    }

    /// Connects a pool to `url` and returns a store with the default configuration.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the database cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let pool = PgPool::connect(url)
            .await
            .map_err(store("connecting to Postgres"))?;
        Ok(Self::new(pool))
    }

    /// Creates the schema and its tables, or brings them up to date. Idempotent, and safe
    /// when several processes call it at once (they take turns on an advisory lock).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when a migration fails, or when the database has
    /// migrations this version of the crate does not know, and [`Error::Config`] when
    /// stored transaction ids are ahead of the cluster's (a store restored from another
    /// cluster, see [`check_transaction_ids`](PgEventStore::check_transaction_ids) and
    /// [`rebase_transaction_ids`](PgEventStore::rebase_transaction_ids)).
    pub async fn migrate(&self) -> Result<(), Error> {
        crate::schema::migrate(&self.inner.pool, &self.inner.schema).await
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema of the store's tables.
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// The channel appends notify (`<schema>_events`), with the last appended position
    /// as payload.
    pub fn notify_channel(&self) -> &str {
        &self.inner.channel
    }

    /// How appends notify [`notify_channel`](PgEventStore::notify_channel).
    pub fn notify_mode(&self) -> NotifyMode {
        self.inner.notify
    }

    /// Whether appends write outbox rows for a relay (see
    /// [`PgEventStoreBuilder::outbox`]).
    pub fn has_outbox(&self) -> bool {
        self.inner.outbox
    }

    /// The group-commit settings, when appends are group-committed (see
    /// [`PgEventStoreBuilder::group_commit`]).
    pub fn group_commit(&self) -> Option<GroupCommit> {
        self.inner.group.as_ref().map(|group| group.config)
    }

    /// The snapshot policy.
    pub fn snapshot_policy(&self) -> &SnapshotPolicy {
        &self.inner.snapshots
    }

    /// [`append`](EventStore::append) inside the caller's transaction: the events, their
    /// outbox rows and the notification commit or roll back with it, so a read model in
    /// the same database can be updated atomically with the events.
    ///
    /// `conn` must be in a transaction opened through sqlx (`pool.begin()`,
    /// `conn.begin()`, or the connection a [`PgProjection`](crate::PgProjection) is
    /// given). The append runs in a savepoint: when it fails (including a conflict) the
    /// savepoint is rolled back and the caller's transaction stays usable. A conflict
    /// still means the caller decided on stale state, so the usual reaction is to roll
    /// back and retry the whole unit of work. On a connection outside a transaction the
    /// append commits on its own.
    ///
    /// # Errors
    ///
    /// As [`EventStore::append`].
    pub async fn append_in<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.inner
            .append_in::<A>(conn, id, expected_version, events, metadata)
            .await
    }

    async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, Error> {
        self.inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))
    }

    /// Deletes the records of command keys older than the
    /// [retention](PgEventStoreBuilder::command_retention); returns how many. Expired
    /// keys are already ignored; this keeps the `commands` table small. Run it now and
    /// then (the bank service runs it hourly).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn prune_commands(&self) -> Result<u64, Error> {
        self.inner.prune_commands().await
    }

    /// Loads the checkpoint `name` on `conn` (e.g. inside a transaction).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn load_checkpoint_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<u64>, Error> {
        crate::checkpoint::load(&mut *conn, &self.inner.sql, name).await
    }

    /// Saves the checkpoint `name` on `conn`, e.g. in the transaction that changed a read
    /// model, so the change and the checkpoint commit together.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the query fails.
    pub async fn save_checkpoint_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
        position: u64,
    ) -> Result<(), Error> {
        crate::checkpoint::save(&mut *conn, &self.inner.sql, name, position).await
    }

    /// [`read_all`](EventStore::read_all) on `conn`. Call it before the transaction
    /// writes anything: a transaction that holds a transaction id keeps the read horizon
    /// below its own id, and would not see events committed after it started.
    ///
    /// # Errors
    ///
    /// As [`EventStore::read_all`].
    pub async fn read_all_in(
        &self,
        conn: &mut PgConnection,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<RawEvent>>, Error> {
        global::read_all(
            conn,
            &self.inner.sql,
            after_position,
            limit,
            self.inner.horizon_wait,
        )
        .await
    }
}

impl EventStore for PgEventStore {
    async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<Loaded<A>, Error> {
        self.inner.load(id).await
    }

    async fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        match &self.inner.group {
            Some(state) => {
                group::append::<A>(&self.inner, state, id, expected_version, events, metadata).await
            }
            None => {
                self.inner
                    .append::<A, _>(&self.inner.pool, id, expected_version, events, metadata)
                    .await
            }
        }
    }

    /// Loads and appends on one pooled connection (one checkout instead of two); with
    /// group commit on, the connection goes back to the pool before the append joins a
    /// batch.
    async fn load_decide_append<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        decide: F,
    ) -> Result<Decided<A>, Error>
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        let loaded = self.inner.load_on::<A>(&mut conn, id).await?;
        let events = decide(&loaded.aggregate)?;
        if events.is_empty() {
            return Ok((loaded, Vec::new()));
        }
        let version = loaded.version;
        let stored = match &self.inner.group {
            Some(state) => {
                drop(conn);
                group::append::<A>(&self.inner, state, id, version, events, metadata).await?
            }
            None => {
                self.inner
                    .append::<A, _>(&mut *conn, id, version, events, metadata)
                    .await?
            }
        };
        Ok((loaded, stored))
    }

    async fn find_command<A: Aggregate>(
        &self,
        id: &A::Id,
        key: &CommandKey,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        let mut conn = self.acquire().await?;
        self.inner.find_command::<A>(&mut conn, id, key).await
    }

    async fn record_command<A: Aggregate>(
        &self,
        id: &A::Id,
        version: u64,
        key: &CommandKey,
        rejection: Option<&Rejection>,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        let mut conn = self.acquire().await?;
        self.inner
            .record_command::<A>(&mut conn, id, version, key, rejection)
            .await
    }

    /// Never group-committed: the key's record is checked in the append's own
    /// statement.
    async fn append_once<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> Result<Once<A::Event>, Error> {
        let mut conn = self.acquire().await?;
        self.inner
            .append_once::<A>(&mut conn, id, expected_version, events, metadata, key)
            .await
    }

    /// Loads, decides and records on one pooled connection (one checkout).
    async fn load_decide_once<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        key: &CommandKey,
        decide: F,
    ) -> Result<(Loaded<A>, Once<A::Event>), Error>
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        let mut conn = self.acquire().await?;
        let loaded = self.inner.load_on::<A>(&mut conn, id).await?;
        let version = loaded.version;
        let once = match decide(&loaded.aggregate) {
            Err(err) => {
                let Some(rejection) = Rejection::of(&err) else {
                    return Err(err);
                };
                match self
                    .inner
                    .record_command::<A>(&mut conn, id, version, key, Some(&rejection))
                    .await?
                {
                    None => return Err(err),
                    Some(earlier) => earlier.into_replay()?,
                }
            }
            Ok(events) if events.is_empty() => {
                match self
                    .inner
                    .record_command::<A>(&mut conn, id, version, key, None)
                    .await?
                {
                    None => Once::Stored(Vec::new()),
                    Some(earlier) => earlier.into_replay()?,
                }
            }
            Ok(events) => {
                self.inner
                    .append_once::<A>(&mut conn, id, version, events, metadata, key)
                    .await?
            }
        };
        Ok((loaded, once))
    }

    async fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.inner.read_stream::<A>(id, after_sequence).await
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<RawEvent>>, Error> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))?;
        self.read_all_in(&mut conn, after_position, limit).await
    }

    async fn wait_for_events(&self, after_position: u64, timeout: Duration) {
        notify::wait_for_events(&self.inner, after_position, timeout).await;
    }
}
