//! In-process subscriptions: run projections against a store without a broker.

use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use tracing::{debug, warn};

use crate::{Aggregate, CheckpointStore, Error, Event, EventStore, Projection};

/// Feeds one aggregate type's events from a store to a [`Projection`], from the
/// projection's checkpoint on, and follows new events as they are stored.
///
/// This is the embedded read side: with it an application is a complete CQRS loop with
/// no broker. Delivery is at least once and in global order; the checkpoint is saved
/// after every batch, so after a crash the projection sees at most one batch again.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use thalo::{commands, events, Aggregate, Error, EventEnvelope, EventHandler};
/// use thalo::{InMemoryEventStore, Projection, Repository, Subscription};
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Counter {
///     #[identity]
///     id: u64,
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
///         let _ = by;
///     }
/// }
///
/// #[derive(Default)]
/// struct Total(AtomicU64);
///
/// impl EventHandler<CounterEvent> for Total {
///     async fn handle(&self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), Error> {
///         let CounterEvent::Incremented(e) = &envelope.event;
///         self.0.fetch_add(e.by, Ordering::SeqCst);
///         Ok(())
///     }
/// }
///
/// impl Projection<CounterEvent> for Total {
///     fn name(&self) -> &str {
///         "total"
///     }
/// }
///
/// let store = InMemoryEventStore::new();
/// let repo = Repository::new(store.clone());
/// repo.execute::<Counter>(&1, CounterCommand::Increment { by: 2 }).await?;
/// repo.execute::<Counter>(&2, CounterCommand::Increment { by: 3 }).await?;
///
/// let mut subscription = Subscription::new::<Counter>(store, Total::default());
/// assert_eq!(subscription.catch_up().await?, 2);
/// assert_eq!(subscription.projection().0.load(Ordering::SeqCst), 5);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct Subscription<S, P, E> {
    store: S,
    projection: P,
    aggregate_type: &'static str,
    batch_size: usize,
    idle_timeout: Duration,
    _event: PhantomData<fn() -> E>,
}

impl<S, P, E> Subscription<S, P, E>
where
    S: EventStore + CheckpointStore,
    P: Projection<E>,
    E: Event,
{
    /// A subscription feeding the events of aggregate `A` to `projection`.
    pub fn new<A: Aggregate<Event = E>>(store: S, projection: P) -> Self {
        Subscription {
            store,
            projection,
            aggregate_type: A::TYPE,
            batch_size: 500,
            idle_timeout: Duration::from_secs(1),
            _event: PhantomData,
        }
    }

    /// How many events to read per batch (default 500).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long to wait for a wake-up from the store before polling again (default 1 s).
    #[must_use]
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// Handles every event stored so far that the projection has not seen, saves the
    /// checkpoint, and returns how many events were handled.
    ///
    /// # Errors
    ///
    /// Returns the first error of the store or the projection; events before it stay
    /// handled and checkpointed.
    pub async fn catch_up(&mut self) -> Result<u64, Error> {
        let name = self.projection.name().to_owned();
        let mut position = self.store.load_checkpoint(&name).await?.unwrap_or(0);
        let mut handled = 0;
        loop {
            let batch = self.store.read_all(position, self.batch_size).await?;
            let Some(last) = batch.last().map(|e| e.position) else {
                return Ok(handled);
            };
            let full = batch.len() == self.batch_size;
            let mut result = Ok(());
            for raw in batch
                .iter()
                .filter(|e| e.aggregate_type == self.aggregate_type)
            {
                let envelope = raw.decode::<E>()?;
                if let Err(err) = self.projection.handle(&envelope).await {
                    result = Err(match err {
                        err @ Error::Handler { .. } => err,
                        err => Error::handler(name.clone(), err),
                    });
                    break;
                }
                position = envelope.position;
                handled += 1;
            }
            if result.is_ok() {
                position = last;
            }
            self.store.save_checkpoint(&name, position).await?;
            result?;
            if !full {
                return Ok(handled);
            }
        }
    }

    /// Catches up, then follows new events until `shutdown` resolves.
    ///
    /// Store errors are logged and retried after the idle timeout. A projection error or
    /// an event that cannot be decoded stops the subscription and is returned; the
    /// checkpoint stays before that event.
    ///
    /// # Errors
    ///
    /// Returns the projection's error ([`Error::Handler`]) or the decoding error.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<P, Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            match self.catch_up().await {
                Ok(n) if n > 0 => debug!(
                    projection = self.projection.name(),
                    handled = n,
                    "caught up"
                ),
                Ok(_) => {}
                Err(err @ Error::Store { .. }) => {
                    warn!(projection = self.projection.name(), error = %err, "subscription failed, retrying")
                }
                Err(err) => return Err(err),
            }
            let position = self
                .store
                .load_checkpoint(self.projection.name())
                .await
                .ok()
                .flatten()
                .unwrap_or(0);
            tokio::select! {
                () = &mut shutdown => return Ok(self.projection),
                () = self.store.wait_for_events(position, self.idle_timeout) => {}
            }
        }
    }
}
