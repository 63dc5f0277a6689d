//! An in-memory event store for tests, examples and embedded use.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    Aggregate, AggregateType, CheckpointStore, CommandId, CommandKey, Error, EventEnvelope,
    EventStore, Loaded, Metadata, Once, RawEvent, Recorded, Rejection, DEFAULT_COMMAND_RETENTION,
};

/// An [`EventStore`] that keeps everything in memory.
///
/// It has the same semantics as the Postgres store: atomic appends, optimistic
/// concurrency (of two concurrent appends with the same expected version exactly one
/// wins), contiguous sequences from 1, global positions from 1, and events stored
/// encoded, so serialization problems show up here too, and idempotent commands
/// ([`EventStore::append_once`]) with a retention
/// ([`with_command_retention`](InMemoryEventStore::with_command_retention)). It does not keep snapshots:
/// replaying from memory is cheap. Cloning gives another handle to the same store.
///
/// ```
/// # tokio_test_block_on(async {
/// use thalo::{EventStore, InMemoryEventStore};
///
/// let store = InMemoryEventStore::new();
/// let all = store.read_all(0, 100).await.unwrap();
/// assert!(all.is_empty());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Default)]
pub struct InMemoryEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// The last stored global position, for subscribers waiting for new events.
    head: watch::Sender<u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            state: Mutex::default(),
            head: watch::Sender::new(0),
        }
    }
}

struct State {
    /// The global log; the event at index `i` has position `i + 1`.
    log: Vec<EventEnvelope<RawEvent>>,
    /// Indices into `log` per `(aggregate type, aggregate id)`.
    streams: HashMap<(&'static str, String), Vec<usize>>,
    checkpoints: HashMap<String, u64>,
    /// Recorded command keys.
    commands: HashMap<CommandId, RecordedCommand>,
    command_retention: Duration,
}

impl Default for State {
    fn default() -> Self {
        State {
            log: Vec::new(),
            streams: HashMap::new(),
            checkpoints: HashMap::new(),
            commands: HashMap::new(),
            command_retention: DEFAULT_COMMAND_RETENTION,
        }
    }
}

/// What a command key recorded: where, which command, and which events.
struct RecordedCommand {
    aggregate_type: &'static str,
    aggregate_id: String,
    fingerprint: i64,
    /// Sequences of the events it stored (an empty range when it stored none).
    first_sequence: u64,
    last_sequence: u64,
    rejection: Option<Rejection>,
    recorded_at: Instant,
}

impl State {
    /// What the recorded key `key` (unexpired) did, checked against the command and
    /// aggregate.
    fn recorded<A: Aggregate>(
        &self,
        aggregate_id: &str,
        key: &CommandKey,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        let Some(recorded) = self.commands.get(&key.id) else {
            return Ok(None);
        };
        if recorded.recorded_at.elapsed() > self.command_retention {
            return Ok(None);
        }
        if recorded.aggregate_type != A::TYPE
            || recorded.aggregate_id != aggregate_id
            || recorded.fingerprint != key.fingerprint
        {
            return Err(Error::CommandIdReused {
                command_id: key.id.to_string(),
                aggregate_type: recorded.aggregate_type.to_owned(),
                aggregate_id: recorded.aggregate_id.clone(),
            });
        }
        if let Some(rejection) = &recorded.rejection {
            return Ok(Some(Recorded::Rejected(rejection.clone())));
        }
        self.stream_range::<A>(
            aggregate_id,
            recorded.first_sequence,
            recorded.last_sequence,
        )
        .map(|events| Some(Recorded::Stored(events)))
    }

    /// Decoded events `first..=last` of a stream.
    fn stream_range<A: Aggregate>(
        &self,
        aggregate_id: &str,
        first: u64,
        last: u64,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        let key = (<A as AggregateType>::TYPE, aggregate_id.to_owned());
        let Some(indices) = self.streams.get(&key) else {
            return Ok(Vec::new());
        };
        if last < first {
            return Ok(Vec::new());
        }
        let skip = usize::try_from(first.saturating_sub(1)).unwrap_or(usize::MAX);
        let take = usize::try_from(last.saturating_sub(first) + 1).unwrap_or(usize::MAX);
        indices
            .iter()
            .skip(skip)
            .take(take)
            .filter_map(|&i| self.log.get(i))
            .map(EventEnvelope::decode)
            .collect()
    }
}

impl fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("InMemoryEventStore")
            .field("events", &state.log.len())
            .field("streams", &state.streams.len())
            .finish()
    }
}

impl InMemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps command keys ([`EventStore::append_once`]) for `retention` (default
    /// [`DEFAULT_COMMAND_RETENTION`]); an older key is forgotten. Applies to every
    /// clone of this store.
    #[must_use]
    pub fn with_command_retention(self, retention: Duration) -> Self {
        self.state().command_retention = retention;
        self
    }

    /// Forgets command keys older than the retention; returns how many. Expired keys
    /// are ignored anyway; this frees their memory.
    pub fn prune_commands(&self) -> usize {
        let mut state = self.state();
        let retention = state.command_retention;
        let before = state.commands.len();
        state
            .commands
            .retain(|_, recorded| recorded.recorded_at.elapsed() <= retention);
        before - state.commands.len()
    }

    /// Number of stored events.
    pub fn len(&self) -> usize {
        self.state().log.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written: appends
        // validate and encode everything before they touch it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn stream_events<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> Vec<EventEnvelope<RawEvent>> {
        let state = self.state();
        let key = (<A as AggregateType>::TYPE, id.to_string());
        state
            .streams
            .get(&key)
            .map(|indices| {
                indices
                    .iter()
                    .skip(usize::try_from(after_sequence).unwrap_or(usize::MAX))
                    .filter_map(|&i| state.log.get(i).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl EventStore for InMemoryEventStore {
    async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<Loaded<A>, Error> {
        let mut aggregate = A::new(id.clone());
        let mut version = 0;
        for envelope in self.stream_events::<A>(id, 0) {
            let raw = &envelope.event;
            aggregate.apply(<A::Event as crate::Event>::decode_from(
                A::TYPE,
                &raw.event_type,
                raw.version,
                &raw.payload,
            )?);
            version = envelope.sequence;
        }
        Ok(Loaded { aggregate, version })
    }

    async fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.append_keyed::<A>(id, expected_version, events, metadata, None)
            .map(Once::into_events)
    }

    async fn find_command<A: Aggregate>(
        &self,
        id: &A::Id,
        key: &CommandKey,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        self.state().recorded::<A>(&id.to_string(), key)
    }

    async fn record_command<A: Aggregate>(
        &self,
        id: &A::Id,
        version: u64,
        key: &CommandKey,
        rejection: Option<&Rejection>,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        let aggregate_id = id.to_string();
        let mut state = self.state();
        if let Some(recorded) = state.recorded::<A>(&aggregate_id, key)? {
            return Ok(Some(recorded));
        }
        state.commands.insert(
            key.id.clone(),
            RecordedCommand {
                aggregate_type: A::TYPE,
                aggregate_id,
                fingerprint: key.fingerprint,
                first_sequence: version + 1,
                last_sequence: version,
                rejection: rejection.cloned(),
                recorded_at: Instant::now(),
            },
        );
        Ok(None)
    }

    async fn append_once<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> Result<Once<A::Event>, Error> {
        self.append_keyed::<A>(id, expected_version, events, metadata, Some(key))
    }

    async fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.stream_events::<A>(id, after_sequence)
            .iter()
            .map(EventEnvelope::decode)
            .collect()
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<RawEvent>>, Error> {
        let state = self.state();
        let start = usize::try_from(after_position).unwrap_or(usize::MAX);
        Ok(state.log.iter().skip(start).take(limit).cloned().collect())
    }

    async fn wait_for_events(&self, after_position: u64, timeout: Duration) {
        let mut head = self.inner.head.subscribe();
        // `wait_for` checks the current value first, so an append between the caller's
        // read and this call is not missed.
        let _ = tokio::time::timeout(timeout, head.wait_for(|&p| p > after_position)).await;
    }
}

impl InMemoryEventStore {
    /// Appends, recording `key` with the events when there is one: under one lock, so
    /// the key and the events are stored together or not at all.
    fn append_keyed<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: Option<&CommandKey>,
    ) -> Result<Once<A::Event>, Error> {
        if events.is_empty() {
            return Ok(Once::Stored(Vec::new()));
        }
        // Encode before taking the lock: a serialization error stores nothing.
        let raw = events
            .iter()
            .map(RawEvent::encode)
            .collect::<Result<Vec<_>, _>>()?;
        let aggregate_id = id.to_string();
        // Microseconds, as Postgres keeps them, so both stores return identical envelopes.
        let timestamp = Utc::now().trunc_subsecs(6);

        let (head, stored) = {
            let mut state = self.state();
            if let Some(key) = key {
                if let Some(recorded) = state.recorded::<A>(&aggregate_id, key)? {
                    return recorded.into_replay();
                }
            }
            let stream = (<A as AggregateType>::TYPE, aggregate_id.clone());
            let actual = state.streams.get(&stream).map_or(0, |s| s.len() as u64);
            if actual != expected_version {
                return Err(Error::Conflict {
                    aggregate_type: A::TYPE.into(),
                    aggregate_id,
                    expected: expected_version,
                    actual: Some(actual),
                    source: None,
                });
            }
            let first_index = state.log.len();
            let mut stored = Vec::with_capacity(raw.len());
            for (offset, event) in raw.into_iter().enumerate() {
                let envelope = EventEnvelope {
                    id: Uuid::now_v7(),
                    aggregate_type: A::TYPE.to_owned(),
                    aggregate_id: aggregate_id.clone(),
                    sequence: expected_version + offset as u64 + 1,
                    position: (first_index + offset) as u64 + 1,
                    timestamp,
                    metadata: metadata.clone(),
                    event,
                };
                stored.push((envelope.id, envelope.sequence, envelope.position));
                state.log.push(envelope);
            }
            let last_index = state.log.len();
            state
                .streams
                .entry(stream)
                .or_default()
                .extend(first_index..last_index);
            if let Some(key) = key {
                state.commands.insert(
                    key.id.clone(),
                    RecordedCommand {
                        aggregate_type: A::TYPE,
                        aggregate_id: aggregate_id.clone(),
                        fingerprint: key.fingerprint,
                        first_sequence: expected_version + 1,
                        last_sequence: expected_version + stored.len() as u64,
                        rejection: None,
                        recorded_at: Instant::now(),
                    },
                );
            }
            (last_index as u64, stored)
        };
        self.inner.head.send_replace(head);

        Ok(Once::Stored(
            events
                .into_iter()
                .zip(stored)
                .map(|(event, (event_id, sequence, position))| EventEnvelope {
                    id: event_id,
                    aggregate_type: A::TYPE.to_owned(),
                    aggregate_id: aggregate_id.clone(),
                    sequence,
                    position,
                    timestamp,
                    metadata: metadata.clone(),
                    event,
                })
                .collect(),
        ))
    }
}

impl CheckpointStore for InMemoryEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, Error> {
        Ok(self.state().checkpoints.get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error> {
        self.state().checkpoints.insert(name.to_owned(), position);
        Ok(())
    }
}
