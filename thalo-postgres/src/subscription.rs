//! In-process, exactly-once projection runner over the global log.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use thalo::__private::Backoff;
use thalo::{Aggregate, Error, Event, EventEnvelope, EventSet, EventStore, Progress, Shutdown};
use tracing::{debug, info, warn};

use crate::error::store;
use crate::{
    checkpoint, checkpoint_key, global, sql, Applied, PgEventStore, PgProjection, ReadModelTable,
    VersionState,
};

/// Feeds the events of one aggregate type ([`new`](PgSubscription::new)), or of several
/// ([`new_set`](PgSubscription::new_set)), from a [`PgEventStore`] to a
/// [`PgProjection`], with exactly-once effects, and follows new events as they are
/// appended.
///
/// Each batch is one transaction: it takes a transaction-scoped advisory lock on the
/// projection's name (so two runners of the same projection take turns instead of
/// applying the same batch twice), reads the projection's checkpoint (the `checkpoints`
/// table, named after the projection) and up to `batch_size` events of the global log
/// after it, applies the events of the aggregate types with
/// [`PgEventStore::apply_exactly_once_in`], saves the checkpoint, and commits. A crash or
/// an error anywhere rolls back the read-model changes and the checkpoint together, so
/// the batch is applied again, once, on restart.
///
/// New events wake the runner through `LISTEN/NOTIFY`, with polling every idle timeout as
/// a fallback.
///
/// ```no_run
/// # use thalo::{Error, EventEnvelope};
/// # use thalo_postgres::{PgEventStore, PgProjection, PgSubscription};
/// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
/// # pub struct Account { #[identity] id: String }
/// # #[thalo::commands] impl Account {
/// #     pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> { Ok(DepositedEvent { amount }) }
/// # }
/// # #[thalo::events] impl Account { pub fn deposited(&mut self, amount: i64) { let _ = amount; } }
/// # struct Balances;
/// # impl PgProjection<AccountEvent> for Balances {
/// #     fn name(&self) -> &str { "balances" }
/// #     async fn handle(&self, _: &mut sqlx::PgConnection, _: &EventEnvelope<AccountEvent>) -> Result<(), Error> { Ok(()) }
/// # }
/// # async fn example(store: PgEventStore) -> Result<(), Error> {
/// let stop = thalo::Shutdown::new(); // Shutdown::on_signal() in a service
/// let subscription = PgSubscription::new::<Account>(store, Balances);
/// let running = tokio::spawn(subscription.run(stop.clone()));
/// // ...
/// stop.trigger();
/// let _projection = running.await.map_err(|e| Error::handler("balances", e))??;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PgSubscription<P, E> {
    store: PgEventStore,
    projection: P,
    /// The aggregate types whose events the projection gets.
    /// Whether an aggregate type's events are read.
    includes: fn(&str) -> bool,
    batch_size: usize,
    poll_interval: Duration,
    /// The versioned read model this subscription builds and promotes, if any.
    read_model: Option<Vec<ReadModelTable>>,
    /// Whether this subscription's version is settled: live, retired, or not promoted
    /// once caught up. Nothing more to do about versions.
    settled: AtomicBool,
    progress: Progress,
    _event: PhantomData<fn() -> E>,
}

/// One batch's outcome.
struct Step {
    /// Events read from the log (of every aggregate type).
    read: usize,
    applied: Applied,
    /// The checkpoint after the batch.
    position: u64,
    /// When the batch's last event was stored.
    last_stored: Option<DateTime<Utc>>,
}

impl<P, E> PgSubscription<P, E>
where
    P: PgProjection<E>,
    E: Event,
{
    /// A subscription feeding the events of aggregate `A` to `projection`.
    pub fn new<A: Aggregate<Event = E>>(store: PgEventStore, projection: P) -> Self {
        Self::over(store, projection, |aggregate_type| {
            aggregate_type == A::TYPE
        })
    }

    /// A subscription feeding the events of every aggregate type of the event set `E`
    /// (see [`thalo::event_set!`]) to `projection`, in the store's global order, with
    /// exactly-once effects: a multi-stream projection, whose read model may be keyed by
    /// anything (an owner, a day), not only by one aggregate.
    ///
    /// Each batch is one transaction, as with [`new`](PgSubscription::new): the
    /// projection's per-stream checkpoints (`stream_checkpoints`, one row per aggregate
    /// of any of the types) and its one global checkpoint commit with the read-model
    /// changes. `E` is usually inferred from the projection's `PgProjection<E>` impl;
    /// name it with `PgSubscription::<_, OwnerEvent>::new_set(..)` otherwise.
    ///
    /// ```no_run
    /// # use thalo::{Error, EventEnvelope};
    /// # use thalo_postgres::{PgEventStore, PgProjection, PgSubscription};
    /// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
    /// # pub struct Account { #[identity] id: String }
    /// # #[thalo::commands] impl Account {
    /// #     pub fn deposit(&self, owner: String, cents: i64) -> Result<DepositedEvent, Error> { Ok(DepositedEvent { owner, cents }) }
    /// # }
    /// # #[thalo::events] impl Account { pub fn deposited(&mut self, owner: String, cents: i64) { let _ = (owner, cents); } }
    /// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
    /// # pub struct Card { #[identity] id: String }
    /// # #[thalo::commands] impl Card {
    /// #     pub fn charge(&self, owner: String, cents: i64) -> Result<ChargedEvent, Error> { Ok(ChargedEvent { owner, cents }) }
    /// # }
    /// # #[thalo::events] impl Card { pub fn charged(&mut self, owner: String, cents: i64) { let _ = (owner, cents); } }
    /// thalo::event_set! {
    ///     /// What the per-owner view reads.
    ///     pub enum OwnerEvent {
    ///         Account(Account),
    ///         Card(Card),
    ///     }
    /// }
    ///
    /// struct PerOwner;
    ///
    /// impl PgProjection<OwnerEvent> for PerOwner {
    ///     fn name(&self) -> &str {
    ///         "per_owner"
    ///     }
    ///
    ///     async fn handle(
    ///         &self,
    ///         tx: &mut sqlx::PgConnection,
    ///         envelope: &EventEnvelope<OwnerEvent>,
    ///     ) -> Result<(), Error> {
    ///         let (owner, cents) = match &envelope.event {
    ///             OwnerEvent::Account(AccountEvent::Deposited(e)) => (&e.owner, e.cents),
    ///             OwnerEvent::Card(CardEvent::Charged(e)) => (&e.owner, -e.cents),
    ///         };
    ///         sqlx::query(
    ///             "INSERT INTO per_owner (owner, cents) VALUES ($1, $2)
    ///              ON CONFLICT (owner) DO UPDATE SET cents = per_owner.cents + EXCLUDED.cents",
    ///         )
    ///         .bind(owner)
    ///         .bind(cents)
    ///         .execute(tx)
    ///         .await
    ///         .map_err(|e| Error::store("updating per_owner", e))?;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # async fn example(store: PgEventStore) -> Result<(), Error> {
    /// let subscription = PgSubscription::new_set(store, PerOwner);
    /// subscription.run(thalo::Shutdown::on_signal()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new_set(store: PgEventStore, projection: P) -> Self
    where
        E: EventSet,
    {
        Self::over(store, projection, E::includes)
    }

    fn over(store: PgEventStore, projection: P, includes: fn(&str) -> bool) -> Self {
        PgSubscription {
            store,
            projection,
            includes,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            read_model: None,
            settled: AtomicBool::new(false),
            progress: Progress::new(),
            _event: PhantomData,
        }
    }

    /// Builds the projection's [version](PgProjection::version) of a versioned read model
    /// and makes it live once it has caught up: blue/green rebuilds without downtime (see
    /// [`ReadModelTable`]).
    ///
    /// The first catch-up registers the version with its `tables` (promoting it at once
    /// when no version is live yet). While another version is live, this one is built
    /// from the start of the store into its own tables and checkpoints; the first time a
    /// catch-up reaches the end of the log, [`PgEventStore::promote`] points the views at
    /// this version's tables and retires the old version (whose tables stay until
    /// [`PgEventStore::drop_version`]). Deploy the new version beside the old one; stop
    /// the old one once the new one is live.
    ///
    /// ```no_run
    /// # use thalo::Error;
    /// # use thalo_postgres::{PgEventStore, PgProjection, PgSubscription, ReadModelTable};
    /// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
    /// # pub struct Account { #[identity] id: String }
    /// # #[thalo::commands] impl Account { pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> { Ok(DepositedEvent { amount }) } }
    /// # #[thalo::events] impl Account { pub fn deposited(&mut self, amount: i64) { let _ = amount; } }
    /// # struct Balances { table: ReadModelTable }
    /// # impl PgProjection<AccountEvent> for Balances {
    /// #     fn name(&self) -> &str { "balances" }
    /// #     fn version(&self) -> u32 { self.table.version() }
    /// #     async fn handle(&self, _: &mut sqlx::PgConnection, _: &thalo::EventEnvelope<AccountEvent>) -> Result<(), Error> { Ok(()) }
    /// # }
    /// # async fn example(store: PgEventStore) -> Result<(), Error> {
    /// // Version 2 writes balances_v2; readers query the view `balances`.
    /// let table = ReadModelTable::new(store.schema(), "balances", 2)?;
    /// // ... CREATE TABLE IF NOT EXISTS {table.table()} ...
    /// let subscription = PgSubscription::new::<Account>(store.clone(), Balances { table: table.clone() })
    ///     .with_read_model(vec![table]);
    /// subscription.run(thalo::Shutdown::on_signal()).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn with_read_model(mut self, tables: Vec<ReadModelTable>) -> Self {
        self.read_model = Some(tables);
        self
    }

    /// How many events of the global log to read per batch and transaction (default 500).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long to wait for a notification before polling (default 1 s).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// A handle that shows how far this subscription has got while it runs (its
    /// checkpoint, events applied, whether it is caught up) and waits until it has
    /// applied given events: read-your-writes in the process that runs the
    /// subscription (see [`thalo::Progress`]). Take it before
    /// [`run`](PgSubscription::run), which consumes the subscription. From another
    /// process, wait on the store's checkpoints with
    /// [`PgEventStore::wait_until_projected`].
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Applies every event appended so far that the projection has not seen, batch by
    /// batch, and returns how many events were applied and skipped.
    ///
    /// # Errors
    ///
    /// Returns the projection's error ([`Error::Handler`]), a decoding error for an event
    /// of the aggregate types that cannot be decoded, or [`Error::Store`]. The failing
    /// batch is rolled back; earlier batches stay committed.
    pub async fn catch_up(&self) -> Result<Applied, Error> {
        self.catch_up_from().await.map(|(applied, _)| applied)
    }

    async fn catch_up_from(&self) -> Result<(Applied, u64), Error> {
        let registered = self.register().await?;
        let mut total = Applied::default();
        loop {
            let step = self.step().await?;
            total += step.applied;
            self.progress.advance(
                step.position,
                step.applied.applied as u64,
                step.read < self.batch_size,
            );
            // A batch that was not full read to the end of the log: nothing is known to
            // wait. A full one says at least one more batch may.
            let lag = if step.read < self.batch_size {
                0
            } else {
                self.batch_size as u64
            };
            let last_stored = step.last_stored.filter(|_| lag > 0);
            thalo::__private::projection_progress(
                self.projection.name(),
                step.position,
                lag,
                last_stored,
            );
            if step.read < self.batch_size {
                if registered {
                    self.promote().await?;
                }
                return Ok((total, step.position));
            }
        }
    }

    /// Registers the versioned read model on the first catch-up; whether there is one.
    async fn register(&self) -> Result<bool, Error> {
        let Some(tables) = &self.read_model else {
            return Ok(false);
        };
        if self.settled.load(Ordering::Acquire) {
            return Ok(true);
        }
        let (name, version) = (self.projection.name(), self.projection.version());
        match self.store.register_version(name, version, tables).await? {
            VersionState::Building => {}
            // Live already, or retired (an old deployment still running): nothing to
            // promote. Only an operator promotes a retired version back.
            _ => self.settled.store(true, Ordering::Release),
        }
        Ok(true)
    }

    /// Promotes the read model's version once it has caught up, if it is building and
    /// newer than the live one.
    async fn promote(&self) -> Result<(), Error> {
        let Some(tables) = &self.read_model else {
            return Ok(());
        };
        if self.settled.load(Ordering::Acquire) {
            return Ok(());
        }
        let (name, version) = (self.projection.name(), self.projection.version());
        if self
            .store
            .promote_if_building(name, version, tables)
            .await?
        {
            info!(
                projection = name,
                version, "caught up; the new version is live"
            );
        } else {
            debug!(
                projection = name,
                version, "caught up; not promoted (not building, or older than the live version)"
            );
        }
        self.settled.store(true, Ordering::Release);
        Ok(())
    }

    /// Applies one batch in one transaction.
    async fn step(&self) -> Result<Step, Error> {
        let inner = &self.store.inner;
        let key = checkpoint_key(self.projection.name(), self.projection.version());
        let name = key.as_ref();
        let mut tx = inner
            .pool
            .begin()
            .await
            .map_err(store("beginning a subscription transaction"))?;
        sqlx::query(sql::ADVISORY_XACT_LOCK)
            .bind(sql::subscription_lock_key(&inner.schema, name))
            .execute(&mut *tx)
            .await
            .map_err(store("locking the subscription"))?;
        let position = checkpoint::load(&mut tx, &inner.sql, name)
            .await?
            .unwrap_or(0);
        // Read before writing anything: until then the transaction has no transaction id
        // of its own to hold the read horizon back.
        let batch = global::read_all(
            &mut tx,
            &inner.sql,
            position,
            self.batch_size,
            inner.horizon_wait,
        )
        .await?;
        let Some((last, last_stored)) = batch.last().map(|e| (e.position, e.timestamp)) else {
            // End the transaction now rather than when `tx` is dropped: a dropped
            // transaction's ROLLBACK is only sent when its connection is next used or
            // returned to the pool, and until then it holds its locks.
            tx.rollback()
                .await
                .map_err(store("ending an empty subscription transaction"))?;
            return Ok(Step {
                read: 0,
                applied: Applied::default(),
                position,
                last_stored: None,
            });
        };
        let envelopes = batch
            .iter()
            .filter(|e| (self.includes)(&e.aggregate_type))
            .map(EventEnvelope::decode)
            .collect::<Result<Vec<EventEnvelope<E>>, Error>>()?;
        let applied = self
            .store
            .apply_exactly_once_in(&mut tx, &self.projection, &envelopes)
            .await?;
        checkpoint::save(&mut tx, &inner.sql, name, last).await?;
        tx.commit()
            .await
            .map_err(store("committing a subscription batch"))?;
        Ok(Step {
            read: batch.len(),
            applied,
            position: last,
            last_stored: Some(last_stored),
        })
    }

    /// Catches up, then follows new events until `shutdown` is triggered, and returns the
    /// projection. A batch in flight at shutdown is rolled back (and applied by the next
    /// run).
    ///
    /// Store errors are logged and retried with exponential backoff: after 100 ms, then
    /// twice as long after each failed retry, up to 30 s (or the idle timeout, if that
    /// is longer), and from 100 ms again once a catch-up succeeds. A persistent failure
    /// (a database that is down or refuses connections, a store table that went
    /// missing) thus costs a retry now and then, not a busy loop against the database.
    /// A database outage met by the projection's own queries (a lost connection, a pool
    /// timeout, a server restart, a deadlock: [`database_outage`](crate::database_outage))
    /// is retried the same way. Any other error of the projection (a constraint
    /// violation, a bug) comes back as [`Error::Handler`] and stops the subscription.
    ///
    /// # Errors
    ///
    /// Returns the projection's error ([`Error::Handler`]) or the decoding error that
    /// stopped it; the checkpoint stays before the failing batch.
    pub async fn run(self, shutdown: impl Into<Shutdown>) -> Result<P, Error> {
        let shutdown = shutdown.into();
        let mut backoff = Backoff::new(self.poll_interval);
        loop {
            let caught_up = tokio::select! {
                () = shutdown.triggered() => return Ok(self.projection),
                caught_up = self.catch_up_from() => caught_up,
            };
            let position = match caught_up {
                Ok((applied, position)) => {
                    backoff.reset();
                    if applied != Applied::default() {
                        debug!(
                            projection = self.projection.name(),
                            applied = applied.applied,
                            duplicates = applied.duplicates,
                            position,
                            "caught up"
                        );
                    }
                    position
                }
                // The store's own failures, and a database outage met by the
                // projection's queries (a lost connection inside `handle`): retried.
                Err(err)
                    if matches!(err, Error::Store { .. })
                        || crate::database_outage(&err) == Some(true) =>
                {
                    // Not `wait_for_events`: it returns at once when there are events to
                    // read, which is exactly when a failing catch-up would fail again.
                    let delay = backoff.next_delay();
                    warn!(
                        projection = self.projection.name(),
                        error = %err,
                        retry_in = ?delay,
                        "subscription failed, retrying"
                    );
                    tokio::select! {
                        () = shutdown.triggered() => return Ok(self.projection),
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
                Err(err) => return Err(err),
            };
            tokio::select! {
                () = shutdown.triggered() => return Ok(self.projection),
                () = self.store.wait_for_events(position, self.poll_interval) => {}
            }
        }
    }
}
