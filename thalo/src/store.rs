//! The event store abstraction.

use std::future::Future;
use std::time::Duration;

use crate::{
    Aggregate, CommandKey, Error, EventEnvelope, Metadata, Once, RawEvent, Recorded, Rejection,
};

/// An aggregate rebuilt from its stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded<A> {
    /// The aggregate with every stored event applied.
    pub aggregate: A,
    /// Sequence of the last applied event; 0 when the stream is empty.
    pub version: u64,
}

/// The outcome of one command attempt ([`EventStore::load_decide_append`]): the
/// aggregate as loaded (before the new events) and the events as stored.
pub type Decided<A> = (Loaded<A>, Vec<EventEnvelope<<A as Aggregate>::Event>>);

/// Where events live: append with optimistic concurrency, load, read.
///
/// Implemented by [`InMemoryEventStore`](crate::InMemoryEventStore) and by
/// `thalo_postgres::PgEventStore`; both pass the same conformance suite.
///
/// # Consistency
///
/// - Appends are atomic: all events of a call are stored, or none.
/// - [`append`](EventStore::append) succeeds only when the stream's version equals
///   `expected_version`; otherwise it returns [`Error::Conflict`] and stores nothing.
///   Of two concurrent appends with the same expected version, exactly one wins.
/// - [`append_once`](EventStore::append_once) records a command's key with its events,
///   atomically, and [`record_command`](EventStore::record_command) records a key whose
///   command stored nothing (rejected, or no events): the first record of a key stands,
///   and of two executions of one key at most one stores events; the other (or any
///   later one, within the store's retention) stores nothing and gets the first one's
///   outcome.
/// - [`read_all`](EventStore::read_all) returns events in the store's global order and
///   never skips an event that becomes visible later: an event that is not yet returned
///   when a reader passes its place is returned to that reader later. The global order
///   is commit order; it is position order in the in-memory store, and
///   `(transaction id, position)` order in Postgres, where positions are taken before
///   commit and so may commit out of order.
pub trait EventStore: Send + Sync {
    /// Rebuilds an aggregate from its snapshot (if the store keeps them) and its events.
    /// A stream with no events gives a fresh aggregate at version 0.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the store fails and [`Error::Serialization`] or
    /// [`Error::UnknownEventType`] when a stored event cannot be decoded.
    fn load<A: Aggregate>(
        &self,
        id: &A::Id,
    ) -> impl Future<Output = Result<Loaded<A>, Error>> + Send;

    /// Appends `events` to the aggregate's stream if its version is `expected_version`,
    /// and returns them as stored, with sequences and global positions.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Conflict`] when the stream is not at `expected_version`,
    /// [`Error::Serialization`] when an event cannot be encoded, and [`Error::Store`] when
    /// the store fails.
    fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<A::Event>>, Error>> + Send;

    /// One attempt of a command: loads the aggregate, lets `decide` turn it into events
    /// and appends them with the loaded version as the expected version. Returns the
    /// aggregate as loaded (before the new events) and the stored events; a `decide`
    /// that returns no events stores nothing.
    ///
    /// [`Repository::execute`](crate::Repository::execute) calls this once per attempt.
    /// The default runs [`load`](EventStore::load) and then
    /// [`append`](EventStore::append); a store overrides it when it can do better, as
    /// `PgEventStore` does by running both on one connection.
    ///
    /// # Errors
    ///
    /// Returns what `decide` returns, and the errors of [`load`](EventStore::load) and
    /// [`append`](EventStore::append) ([`Error::Conflict`] when another writer appended
    /// after the load).
    fn load_decide_append<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        decide: F,
    ) -> impl Future<Output = Result<Decided<A>, Error>> + Send
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        async move {
            let loaded = self.load::<A>(id).await?;
            let events = decide(&loaded.aggregate)?;
            if events.is_empty() {
                return Ok((loaded, Vec::new()));
            }
            let stored = self
                .append::<A>(id, loaded.version, events, metadata)
                .await?;
            Ok((loaded, stored))
        }
    }

    /// What the command executed under `key` did (the events it stored, or its
    /// rejection), when the key is recorded and not older than the store's retention;
    /// `None` otherwise.
    ///
    /// # Errors
    ///
    /// Returns [`Error::CommandIdReused`] when the key was recorded for another aggregate
    /// or a command with another fingerprint, [`Error::Store`] when the store fails, and
    /// [`Error::Config`] when the store does not record command keys (the default).
    fn find_command<A: Aggregate>(
        &self,
        id: &A::Id,
        key: &CommandKey,
    ) -> impl Future<Output = Result<Option<Recorded<A::Event>>, Error>> + Send {
        let _ = (id, key);
        async { Err(unsupported_command_keys()) }
    }

    /// Records that the command executed under `key` stored nothing: it was rejected
    /// (`rejection`), or decided on no events (`None`) at the aggregate's `version`.
    /// Returns `None` when it recorded this outcome. When the key was recorded
    /// already, records nothing and returns the earlier record, which stands (it may
    /// have stored events).
    ///
    /// # Errors
    ///
    /// As [`find_command`](EventStore::find_command).
    fn record_command<A: Aggregate>(
        &self,
        id: &A::Id,
        version: u64,
        key: &CommandKey,
        rejection: Option<&Rejection>,
    ) -> impl Future<Output = Result<Option<Recorded<A::Event>>, Error>> + Send {
        let _ = (id, version, key, rejection);
        async { Err(unsupported_command_keys()) }
    }

    /// [`append`](EventStore::append) that records `key` with the events, atomically.
    /// When `key` is already recorded, stores nothing and returns the first execution's
    /// outcome: [`Once::Replayed`] with the events it stored (whatever the expected
    /// version), or its rejection as the error. An empty `events` stores nothing and
    /// records nothing (see [`record_command`](EventStore::record_command)).
    ///
    /// [`Repository::execute_once`](crate::Repository::execute_once) calls it; call it
    /// directly only to build something like it.
    ///
    /// # Errors
    ///
    /// As [`append`](EventStore::append) and [`find_command`](EventStore::find_command).
    fn append_once<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> impl Future<Output = Result<Once<A::Event>, Error>> + Send {
        let _ = (id, expected_version, events, metadata, key);
        async { Err(unsupported_command_keys()) }
    }

    /// One attempt of a command under `key`: loads the aggregate, lets `decide` turn it
    /// into events and appends them with [`append_once`](EventStore::append_once), or
    /// records the rejection or the decision on no events with
    /// [`record_command`](EventStore::record_command). Returns the aggregate as loaded
    /// and the outcome; when the key was recorded before, that record's outcome (its
    /// events as [`Once::Replayed`], or its rejection as the error).
    ///
    /// [`Repository::execute_once`](crate::Repository::execute_once) calls this once per
    /// attempt. The default runs the store's methods one after another; `PgEventStore`
    /// runs them on one connection.
    ///
    /// # Errors
    ///
    /// A rejection (the first execution's, or the recorded one), and the errors of the
    /// methods it calls ([`Error::Conflict`] when another writer appended after the
    /// load).
    fn load_decide_once<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        key: &CommandKey,
        decide: F,
    ) -> impl Future<Output = Result<(Loaded<A>, Once<A::Event>), Error>> + Send
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        async move {
            let loaded = self.load::<A>(id).await?;
            let version = loaded.version;
            let once = match decide(&loaded.aggregate) {
                Err(err) => {
                    // Recorded, so that an execution of this key still in flight (a
                    // client's earlier attempt) cannot store events after this one
                    // answered "rejected": the first record stands.
                    let Some(rejection) = Rejection::of(&err) else {
                        return Err(err);
                    };
                    match self
                        .record_command::<A>(id, version, key, Some(&rejection))
                        .await?
                    {
                        None => return Err(err),
                        Some(earlier) => earlier.into_replay()?,
                    }
                }
                Ok(events) if events.is_empty() => {
                    match self.record_command::<A>(id, version, key, None).await? {
                        None => Once::Stored(Vec::new()),
                        Some(earlier) => earlier.into_replay()?,
                    }
                }
                Ok(events) => {
                    self.append_once::<A>(id, version, events, metadata, key)
                        .await?
                }
            };
            Ok((loaded, once))
        }
    }

    /// Reads an aggregate's events with a sequence greater than `after_sequence`, in order.
    ///
    /// # Errors
    ///
    /// As [`EventStore::load`].
    fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<A::Event>>, Error>> + Send;

    /// Reads up to `limit` events of every aggregate that come after the event at
    /// `after_position` in the store's global order (0: from the start). Pass the
    /// position of the last event returned to read on. Events stay encoded: decode them
    /// with [`EventEnvelope::decode`].
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the store fails.
    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<RawEvent>>, Error>> + Send;

    /// Resolves when events after `after_position` may have been stored, or after
    /// `timeout`, whichever comes first. Used by subscriptions to follow the log without
    /// busy polling. The default waits for the whole `timeout` (plain polling).
    fn wait_for_events(
        &self,
        after_position: u64,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send {
        let _ = after_position;
        tokio::time::sleep(timeout)
    }
}

fn unsupported_command_keys() -> Error {
    Error::config("this event store does not record command ids (idempotent commands)")
}

/// Stores the position a projection or handler has processed up to.
pub trait CheckpointStore: Send + Sync {
    /// The stored position of `name`, if any.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the store fails.
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<u64>, Error>> + Send;

    /// Stores `position` as the checkpoint of `name`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Store`] when the store fails.
    fn save_checkpoint(
        &self,
        name: &str,
        position: u64,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

impl<S: EventStore> EventStore for std::sync::Arc<S> {
    fn load<A: Aggregate>(
        &self,
        id: &A::Id,
    ) -> impl Future<Output = Result<Loaded<A>, Error>> + Send {
        (**self).load(id)
    }

    fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<A::Event>>, Error>> + Send {
        (**self).append::<A>(id, expected_version, events, metadata)
    }

    fn load_decide_append<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        decide: F,
    ) -> impl Future<Output = Result<Decided<A>, Error>> + Send
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        (**self).load_decide_append::<A, F>(id, metadata, decide)
    }

    fn find_command<A: Aggregate>(
        &self,
        id: &A::Id,
        key: &CommandKey,
    ) -> impl Future<Output = Result<Option<Recorded<A::Event>>, Error>> + Send {
        (**self).find_command::<A>(id, key)
    }

    fn record_command<A: Aggregate>(
        &self,
        id: &A::Id,
        version: u64,
        key: &CommandKey,
        rejection: Option<&Rejection>,
    ) -> impl Future<Output = Result<Option<Recorded<A::Event>>, Error>> + Send {
        (**self).record_command::<A>(id, version, key, rejection)
    }

    fn append_once<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> impl Future<Output = Result<Once<A::Event>, Error>> + Send {
        (**self).append_once::<A>(id, expected_version, events, metadata, key)
    }

    fn load_decide_once<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        key: &CommandKey,
        decide: F,
    ) -> impl Future<Output = Result<(Loaded<A>, Once<A::Event>), Error>> + Send
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        (**self).load_decide_once::<A, F>(id, metadata, key, decide)
    }

    fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<A::Event>>, Error>> + Send {
        (**self).read_stream::<A>(id, after_sequence)
    }

    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<RawEvent>>, Error>> + Send {
        (**self).read_all(after_position, limit)
    }

    fn wait_for_events(
        &self,
        after_position: u64,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send {
        (**self).wait_for_events(after_position, timeout)
    }
}

impl<S: CheckpointStore> CheckpointStore for std::sync::Arc<S> {
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<u64>, Error>> + Send {
        (**self).load_checkpoint(name)
    }

    fn save_checkpoint(
        &self,
        name: &str,
        position: u64,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).save_checkpoint(name, position)
    }
}
