//! Load -> handle -> append, with retries on concurrency conflicts.

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, Instrument as _};

use crate::cache::{AggregateCache, CacheStats};
use crate::instruments::{self, CommandOutcome};
use crate::trace;
use crate::{
    Aggregate, CommandId, CommandKey, Error, EventEnvelope, EventStore, Loaded, Metadata, Once,
};

/// The command side of an application: runs commands against aggregates in a store.
///
/// [`execute`](Repository::execute) loads the aggregate, lets it handle the command and
/// appends the resulting events with the loaded version as the expected version. When
/// another writer got there first, the store reports a conflict and the repository
/// reloads and handles the command again, up to
/// [`max_attempts`](Repository::with_max_attempts) times, so a command is decided on
/// the latest state and never overwrites a concurrent change.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use thalo::{commands, events, Aggregate, Error, InMemoryEventStore, Repository};
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Counter {
///     #[identity]
///     id: u64,
///     value: u64,
/// }
///
/// #[commands]
/// impl Counter {
///     pub fn increment(&self, by: u64) -> Result<IncrementedEvent, Error> {
///         Ok(IncrementedEvent { by })
///     }
/// }
///
/// #[events]
/// impl Counter {
///     pub fn incremented(&mut self, by: u64) {
///         self.value += by;
///     }
/// }
///
/// let repo = Repository::new(InMemoryEventStore::new());
/// let stored = repo.execute::<Counter>(&1, CounterCommand::Increment { by: 2 }).await?;
/// assert_eq!(stored[0].sequence, 1);
/// assert_eq!(stored[0].event, CounterEvent::Incremented(IncrementedEvent { by: 2 }));
///
/// let counter = repo.load::<Counter>(&1).await?;
/// assert_eq!((counter.aggregate.value, counter.version), (2, 1));
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
///
/// # Aggregate cache
///
/// [`with_cache`](Repository::with_cache) keeps the aggregates this repository has
/// decided commands on in memory, with their versions, so the next command on the same
/// aggregate skips the load and costs one append. It is safe with other writers (other
/// processes, other repositories, direct appends): the append still carries the cached
/// version as the expected version, so a stale entry is detected by the store as a
/// conflict, dropped, and the command is reloaded and retried like any other conflict.
/// A command that the cached aggregate rejects, or decides to be a no-op, is decided
/// again on the stored aggregate, so the cache never changes a command's outcome (a
/// rejection costs a load).
/// Use it when commands on an aggregate mostly come through one process (route commands
/// by aggregate id, as a Kafka consumer group does); with many processes writing the
/// same aggregates, most entries are stale and each costs a conflict and a reload.
///
/// Clones of a repository share its cache.
#[derive(Clone, Debug)]
pub struct Repository<S> {
    store: S,
    max_attempts: u32,
    cache: Option<Arc<AggregateCache>>,
}

impl<S: EventStore> Repository<S> {
    /// Default number of attempts for a command that keeps conflicting.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

    /// A repository over `store`.
    pub fn new(store: S) -> Self {
        Repository {
            store,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            cache: None,
        }
    }

    /// Keeps up to `capacity` aggregates (of all types together, at least 1) in memory
    /// between commands, least recently used out first; see
    /// [the type's docs](Repository#aggregate-cache). [`load`](Repository::load) and
    /// [`get`](Repository::get) always read the store.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use thalo::{commands, events, Aggregate, Error, InMemoryEventStore, Repository};
    ///
    /// #[derive(Aggregate, Debug, Default)]
    /// pub struct Counter {
    ///     #[identity]
    ///     id: u64,
    ///     value: u64,
    /// }
    ///
    /// #[commands]
    /// impl Counter {
    ///     pub fn increment(&self, by: u64) -> Result<IncrementedEvent, Error> {
    ///         Ok(IncrementedEvent { by })
    ///     }
    /// }
    ///
    /// #[events]
    /// impl Counter {
    ///     pub fn incremented(&mut self, by: u64) {
    ///         self.value += by;
    ///     }
    /// }
    ///
    /// let repo = Repository::new(InMemoryEventStore::new()).with_cache(10_000);
    /// for _ in 0..3 {
    ///     repo.execute::<Counter>(&1, CounterCommand::Increment { by: 2 }).await?;
    /// }
    /// let stats = repo.cache_stats().unwrap();
    /// assert_eq!((stats.misses, stats.hits), (1, 2)); // loaded once
    /// assert_eq!(repo.load::<Counter>(&1).await?.aggregate.value, 6);
    /// # Ok::<(), Error>(())
    /// # }).unwrap();
    /// ```
    #[must_use]
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = Some(Arc::new(AggregateCache::new(capacity)));
        self
    }

    /// The aggregate cache's counters, or `None` without a cache.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|cache| cache.stats())
    }

    /// The aggregate cache's capacity, or `None` without a cache.
    pub fn cache_capacity(&self) -> Option<usize> {
        self.cache.as_ref().map(|cache| cache.capacity())
    }

    /// Drops every cached aggregate (for example after restoring the store from a
    /// backup); the next command on each aggregate loads it. Does nothing without a cache.
    pub fn clear_cache(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    /// How many times [`execute`](Repository::execute) tries a command that conflicts
    /// (at least 1). 1 means no retry.
    #[must_use]
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Loads an aggregate and its version. A stream with no events gives a fresh
    /// aggregate at version 0.
    ///
    /// # Errors
    ///
    /// As [`EventStore::load`].
    pub async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<Loaded<A>, Error> {
        self.store.load(id).await
    }

    /// Loads an aggregate that must exist.
    ///
    /// # Errors
    ///
    /// Returns [`Error::NotFound`] when the aggregate has no events, and the errors of
    /// [`EventStore::load`].
    pub async fn get<A: Aggregate>(&self, id: &A::Id) -> Result<Loaded<A>, Error> {
        let loaded = self.store.load::<A>(id).await?;
        if loaded.version == 0 {
            return Err(Error::NotFound {
                aggregate_type: A::TYPE.into(),
                aggregate_id: id.to_string(),
            });
        }
        Ok(loaded)
    }

    /// Runs `command` against the aggregate `id` and returns the stored events.
    ///
    /// A command that produces no events stores nothing and returns an empty list.
    ///
    /// # Errors
    ///
    /// Returns the aggregate's rejection ([`Error::Invariant`] or [`Error::Domain`]),
    /// [`Error::Conflict`] when the command still conflicts after the last attempt, and
    /// the store's errors.
    pub async fn execute<A>(
        &self,
        id: &A::Id,
        command: A::Command,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        self.execute_with::<A>(id, command, &Metadata::default())
            .await
    }

    /// [`execute`](Repository::execute) with metadata (correlation id, causation id,
    /// headers) stored on every resulting event. With a
    /// [`command_id`](Metadata::command_id) in `metadata`, the command is executed once
    /// under that key, as by [`execute_once_with`](Repository::execute_once_with).
    ///
    /// # Errors
    ///
    /// As [`Repository::execute`].
    pub async fn execute_with<A>(
        &self,
        id: &A::Id,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        if let Some(command_id) = &metadata.command_id {
            return self
                .execute_once_with::<A>(id, command_id.clone(), command, metadata)
                .await
                .map(Once::into_events);
        }
        let span = trace::execute_span(A::TYPE, id);
        let metadata = trace::stamp(metadata, &span);
        let started = Instant::now();
        let result = self
            .execute_attempts::<A>(id, command, &metadata)
            .instrument(span.clone())
            .await;
        let outcome = CommandOutcome::of(&result);
        trace::record_outcome(&span, outcome.as_str(), &result);
        instruments::command_finished(A::TYPE, outcome, started);
        result
    }

    /// The attempts of [`execute_with`](Repository::execute_with) without a key.
    async fn execute_attempts<A>(
        &self,
        id: &A::Id,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        let mut attempt = 1;
        loop {
            tracing::Span::current().record("attempt", attempt);
            let attempted = match &self.cache {
                None => self
                    .store
                    .load_decide_append::<A, _>(id, metadata, decide(command.clone()))
                    .await
                    .map(|(_, stored)| stored),
                Some(cache) => {
                    self.attempt_cached::<A>(cache, id, &command, metadata)
                        .await
                }
            };
            match attempted {
                Err(err) if err.is_conflict() && attempt < self.max_attempts => {
                    instruments::command_conflict(A::TYPE);
                    debug!(
                        aggregate_type = A::TYPE,
                        aggregate_id = %id,
                        attempt,
                        "concurrency conflict, reloading and retrying the command"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Runs `command` against the aggregate `id` at most once under the idempotency key
    /// `command_id`.
    ///
    /// The first execution under a key stores its events and the key together,
    /// atomically, and returns [`Once::Stored`]. Any later execution under the same key
    /// (a retry after a timeout or a lost answer, in this process or another, or a
    /// concurrent duplicate) stores nothing and returns [`Once::Replayed`] with the
    /// events the first one stored, whatever deciding the command again would give: a
    /// withdrawal that was stored is not rejected on retry because the balance has
    /// since changed. The events carry the key in [`Metadata::command_id`].
    ///
    /// A new key costs what [`execute`](Repository::execute) costs: the store checks
    /// the key in the statement that appends (or records a rejection), so there is no
    /// lookup up front; the aggregate cache is used as by `execute`.
    ///
    /// One key has one outcome. A command that is rejected, or decides on no events, is
    /// recorded too: its retries get the same rejection (an [`Error::Invariant`] with
    /// the recorded code and message, also for a domain error that had a code, or an
    /// [`Error::Domain`] around a
    /// [`ReplayedRejection`](crate::ReplayedRejection) with the text of the aggregate's
    /// own error) or the same empty outcome, even if the state has changed since, and
    /// an earlier attempt still in flight cannot store events after a retry answered
    /// "rejected". A new attempt at a rejected command needs a new key. Failures that
    /// decide nothing (the store unreachable, conflicts beyond the last attempt) record
    /// nothing. Stores keep keys for a retention period (7 days by default, see
    /// [`DEFAULT_COMMAND_RETENTION`](crate::DEFAULT_COMMAND_RETENTION)); after it the
    /// key is forgotten.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use thalo::{commands, events, Aggregate, CommandId, Error, InMemoryEventStore, Repository};
    ///
    /// #[derive(Aggregate, Debug, Default)]
    /// pub struct Counter {
    ///     #[identity]
    ///     id: u64,
    ///     value: u64,
    /// }
    ///
    /// #[commands]
    /// impl Counter {
    ///     pub fn increment(&self, by: u64) -> Result<IncrementedEvent, Error> {
    ///         Ok(IncrementedEvent { by })
    ///     }
    /// }
    ///
    /// #[events]
    /// impl Counter {
    ///     pub fn incremented(&mut self, by: u64) {
    ///         self.value += by;
    ///     }
    /// }
    ///
    /// let repo = Repository::new(InMemoryEventStore::new());
    /// let key = CommandId::new("request-7")?;
    /// let first = repo.execute_once::<Counter>(&1, key.clone(), CounterCommand::Increment { by: 2 }).await?;
    /// let retry = repo.execute_once::<Counter>(&1, key.clone(), CounterCommand::Increment { by: 2 }).await?;
    /// assert!(!first.is_replayed() && retry.is_replayed());
    /// assert_eq!(first.events(), retry.events());
    /// assert_eq!(repo.load::<Counter>(&1).await?.aggregate.value, 2); // applied once
    ///
    /// // Another command under a used key is refused.
    /// let other = repo.execute_once::<Counter>(&1, key, CounterCommand::Increment { by: 5 }).await;
    /// assert!(matches!(other, Err(Error::CommandIdReused { .. })));
    /// # Ok::<(), Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Repository::execute`], plus [`Error::CommandIdReused`] when the key was used
    /// for a different command (by fingerprint, see [`CommandKey`]) or another
    /// aggregate.
    pub async fn execute_once<A>(
        &self,
        id: &A::Id,
        command_id: CommandId,
        command: A::Command,
    ) -> Result<Once<A::Event>, Error>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        self.execute_once_with::<A>(id, command_id, command, &Metadata::default())
            .await
    }

    /// [`execute_once`](Repository::execute_once) with metadata stored on every
    /// resulting event (its [`command_id`](Metadata::command_id) is set to
    /// `command_id`).
    ///
    /// # Errors
    ///
    /// As [`Repository::execute_once`].
    pub async fn execute_once_with<A>(
        &self,
        id: &A::Id,
        command_id: CommandId,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Once<A::Event>, Error>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        let started = Instant::now();
        let key = CommandKey::new(command_id.clone(), &command);
        let span = trace::execute_span(A::TYPE, id);
        let metadata = trace::stamp(metadata, &span)
            .into_owned()
            .with_command_id(command_id);
        let mut attempt = 1;
        loop {
            span.record("attempt", attempt);
            match self
                .attempt_once::<A>(id, &command, &metadata, &key)
                .instrument(span.clone())
                .await
            {
                Err(err) if err.is_conflict() && attempt < self.max_attempts => {
                    instruments::command_conflict(A::TYPE);
                    debug!(
                        aggregate_type = A::TYPE,
                        aggregate_id = %id,
                        command_id = %key.id,
                        attempt,
                        "concurrency conflict, reloading and retrying the keyed command"
                    );
                    attempt += 1;
                }
                result => {
                    let outcome = match &result {
                        Ok(Once::Replayed(_)) => CommandOutcome::Replayed,
                        result => CommandOutcome::of(result),
                    };
                    trace::record_outcome(&span, outcome.as_str(), &result);
                    instruments::command_finished(A::TYPE, outcome, started);
                    return result;
                }
            }
        }
    }

    /// One attempt of a keyed command. There is no lookup of the key up front: the
    /// store checks it where it records it. An append under a recorded key stores
    /// nothing and returns the record (whatever the version it was decided on), and so
    /// does recording a rejection or a decision on no events, so a retry is answered
    /// from the record even when deciding it again would now be rejected.
    async fn attempt_once<A>(
        &self,
        id: &A::Id,
        command: &A::Command,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> Result<Once<A::Event>, Error>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        // From the cache when it holds the aggregate and it decides on events, as in
        // `attempt_cached`: the append's version check proves the entry current.
        if let Some(cache) = &self.cache {
            if let Some((aggregate, version)) = cache.take::<A>(id) {
                if let Ok(events) = aggregate.handle(command.clone()) {
                    if !events.is_empty() {
                        cache.record_hit(A::TYPE);
                        return match self
                            .store
                            .append_once::<A>(id, version, events, metadata, key)
                            .await
                        {
                            Ok(Once::Stored(stored)) => {
                                cache_applied(cache, id, aggregate, version, &stored);
                                Ok(Once::Stored(stored))
                            }
                            // A replay says nothing of the current state: the entry
                            // stays out.
                            Ok(replayed) => Ok(replayed),
                            Err(err) => {
                                if err.is_conflict() {
                                    cache.record_stale();
                                }
                                Err(err)
                            }
                        };
                    }
                }
            }
            cache.record_miss(A::TYPE);
        }

        let (loaded, once) = self
            .store
            .load_decide_once::<A, _>(id, metadata, key, decide(command.clone()))
            .await?;
        if let (Some(cache), Once::Stored(stored)) = (&self.cache, &once) {
            cache_applied(cache, id, loaded.aggregate, loaded.version, stored);
        }
        Ok(once)
    }

    /// One attempt of a command with the cache: from the cached aggregate when there is
    /// one and it decides on events (append only), else load, decide and append in the
    /// store; on success the aggregate with the new events applied goes (back) into the
    /// cache.
    ///
    /// Only the append's version check proves a cached aggregate current, so a command
    /// that the cached aggregate rejects, or decides to be a no-op, is decided again on
    /// the stored aggregate: the cache never changes a command's outcome.
    async fn attempt_cached<A>(
        &self,
        cache: &AggregateCache,
        id: &A::Id,
        command: &A::Command,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error>
    where
        A: Aggregate,
        A::Command: Clone,
    {
        if let Some((aggregate, version)) = cache.take::<A>(id) {
            if let Ok(events) = aggregate.handle(command.clone()) {
                if !events.is_empty() {
                    cache.record_hit(A::TYPE);
                    return match self.store.append::<A>(id, version, events, metadata).await {
                        Ok(stored) => {
                            cache_applied(cache, id, aggregate, version, &stored);
                            Ok(stored)
                        }
                        Err(err) => {
                            // Stale (another writer appended) or failed: either way the
                            // cached state may no longer be the stream's, so it stays out.
                            if err.is_conflict() {
                                cache.record_stale();
                            }
                            Err(err)
                        }
                    };
                }
            }
            // Rejected or no events: decide again on the stored aggregate.
        }
        cache.record_miss(A::TYPE);
        let (loaded, stored) = self
            .store
            .load_decide_append::<A, _>(id, metadata, decide(command.clone()))
            .await?;
        cache_applied(cache, id, loaded.aggregate, loaded.version, &stored);
        Ok(stored)
    }
}

/// Puts `aggregate` (at `version`) into the cache with the `stored` events applied.
fn cache_applied<A: Aggregate>(
    cache: &AggregateCache,
    id: &A::Id,
    mut aggregate: A,
    mut version: u64,
    stored: &[EventEnvelope<A::Event>],
) {
    for envelope in stored {
        aggregate.apply(envelope.event.clone());
        version = envelope.sequence;
    }
    cache.put(id, aggregate, version);
}

/// The store-side `decide` of one command attempt.
fn decide<A: Aggregate>(
    command: A::Command,
) -> impl FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send {
    move |aggregate| aggregate.handle(command).map_err(A::reject)
}
