//! Load -> handle -> append, with retries on concurrency conflicts.

use tracing::debug;

use crate::{Aggregate, Error, EventEnvelope, EventStore, Loaded, Metadata};

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
#[derive(Clone, Debug)]
pub struct Repository<S> {
    store: S,
    max_attempts: u32,
}

impl<S: EventStore> Repository<S> {
    /// Default number of attempts for a command that keeps conflicting.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

    /// A repository over `store`.
    pub fn new(store: S) -> Self {
        Repository {
            store,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
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
    /// headers) stored on every resulting event.
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
        let mut attempt = 1;
        loop {
            let command = command.clone();
            let attempted = self
                .store
                .load_decide_append::<A, _>(id, metadata, move |aggregate| {
                    aggregate.handle(command).map_err(Into::into)
                })
                .await;
            match attempted {
                Err(err) if err.is_conflict() && attempt < self.max_attempts => {
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
}
