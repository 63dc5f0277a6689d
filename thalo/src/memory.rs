//! An in-memory event store for tests, examples and embedded use.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    Aggregate, AggregateType, CheckpointStore, Error, EventEnvelope, EventStore, Loaded, Metadata,
    RawEvent,
};

/// An [`EventStore`] that keeps everything in memory.
///
/// It has the same semantics as the Postgres store: atomic appends, optimistic
/// concurrency (of two concurrent appends with the same expected version exactly one
/// wins), contiguous sequences from 1, global positions from 1, and events stored
/// encoded, so serialization problems show up here too. It does not keep snapshots:
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

#[derive(Default)]
struct State {
    /// The global log; the event at index `i` has position `i + 1`.
    log: Vec<EventEnvelope<RawEvent>>,
    /// Indices into `log` per `(aggregate type, aggregate id)`.
    streams: HashMap<(&'static str, String), Vec<usize>>,
    checkpoints: HashMap<String, u64>,
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
            aggregate.apply(envelope.event.decode::<A::Event>()?);
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
        if events.is_empty() {
            return Ok(Vec::new());
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
            let key = (<A as AggregateType>::TYPE, aggregate_id.clone());
            let actual = state.streams.get(&key).map_or(0, |s| s.len() as u64);
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
                .entry(key)
                .or_default()
                .extend(first_index..last_index);
            (last_index as u64, stored)
        };
        self.inner.head.send_replace(head);

        Ok(events
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
            .collect())
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

impl CheckpointStore for InMemoryEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, Error> {
        Ok(self.state().checkpoints.get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error> {
        self.state().checkpoints.insert(name.to_owned(), position);
        Ok(())
    }
}
