//! In-process subscriptions: run projections against a store without a broker.

use std::marker::PhantomData;
use std::time::Duration;

use tracing::{debug, warn};

use crate::{
    instruments, Aggregate, CheckpointStore, Error, Event, EventSet, EventStore, Progress,
    Projection, Shutdown,
};

/// Feeds the events of one aggregate type ([`new`](Subscription::new)), or of several
/// ([`new_set`](Subscription::new_set)), from a store to a [`Projection`], from the
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
    /// The aggregate types whose events the projection gets.
    /// Whether an aggregate type's events are read.
    includes: fn(&str) -> bool,
    batch_size: usize,
    poll_interval: Duration,
    progress: Progress,
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
        Self::over(store, projection, |aggregate_type| {
            aggregate_type == A::TYPE
        })
    }

    /// A subscription feeding the events of every aggregate type of the event set `E`
    /// (see [`event_set!`](crate::event_set)) to `projection`, in the store's global
    /// order: a multi-stream projection. Each event is decoded into `E` by its
    /// aggregate type ([`Event::decode_from`]).
    ///
    /// `E` is usually inferred from the projection's `Projection<E>` impl; name it with
    /// `Subscription::<_, _, OwnerEvent>::new_set(..)` when the projection implements
    /// several. See [`event_set!`](crate::event_set) for an example.
    pub fn new_set(store: S, projection: P) -> Self
    where
        E: EventSet,
    {
        Self::over(store, projection, E::includes)
    }

    fn over(store: S, projection: P, includes: fn(&str) -> bool) -> Self {
        Subscription {
            store,
            projection,
            includes,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            progress: Progress::new(),
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
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// A handle that shows how far this subscription has got while it runs, and waits
    /// until it has handled given events (read-your-writes); see [`Progress`]. Take it
    /// before [`run`](Subscription::run), which consumes the subscription.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Handles every event stored so far that the projection has not seen, saves the
    /// checkpoint, and returns how many events were handled.
    ///
    /// # Errors
    ///
    /// Returns the first error of the store, of the projection ([`Error::Handler`]), or
    /// of decoding an event of the aggregate types ([`Error::UnknownEventType`],
    /// [`Error::Serialization`]). Events handled before it stay handled: the checkpoint
    /// is saved at the last of them before the error is returned, so the next catch-up
    /// starts at the failing event and hands no event to the projection twice.
    pub async fn catch_up(&mut self) -> Result<u64, Error> {
        let name = self.projection.name().to_owned();
        let mut position = self.store.load_checkpoint(&name).await?.unwrap_or(0);
        let mut handled = 0;
        loop {
            let batch = self.store.read_all(position, self.batch_size).await?;
            let Some(last) = batch.last().map(|e| e.position) else {
                self.progress.advance(position, 0, true);
                instruments::projection_progress(&name, position, 0, None);
                return Ok(handled);
            };
            let full = batch.len() == self.batch_size;
            let mut result = Ok(());
            let mut batch_handled = 0;
            for raw in batch.iter().filter(|e| (self.includes)(&e.aggregate_type)) {
                // A payload that does not decode stops the batch like a failing handler:
                // the events before it were handled and must be checkpointed, or they
                // would all be handled again by the next catch-up.
                let outcome = match raw.decode::<E>() {
                    Ok(envelope) => {
                        self.projection
                            .handle(&envelope)
                            .await
                            .map_err(|err| match err {
                                err @ Error::Handler { .. } => err,
                                err => Error::handler(name.clone(), err),
                            })
                    }
                    Err(err) => Err(err),
                };
                if let Err(err) = outcome {
                    result = Err(err);
                    break;
                }
                position = raw.position;
                handled += 1;
                batch_handled += 1;
            }
            let Err(err) = result else {
                position = last;
                self.store.save_checkpoint(&name, position).await?;
                self.progress.advance(position, batch_handled, !full);
                // A batch that was not full read up to the end of the log: nothing is
                // known to wait. A full one says at least one more batch may.
                let lag = if full { self.batch_size as u64 } else { 0 };
                let last_stored = batch.last().filter(|_| full).map(|e| e.timestamp);
                instruments::projection_progress(&name, position, lag, last_stored);
                if !full {
                    return Ok(handled);
                }
                continue;
            };
            let saved = self.store.save_checkpoint(&name, position).await;
            if saved.is_ok() {
                self.progress.advance(position, batch_handled, false);
            }
            if let Err(save) = saved {
                // The event's error is the one to report: it is what stops the
                // subscription. The handled events are handled again on the next run.
                warn!(
                    projection = %name,
                    position,
                    error = %save,
                    "saving the checkpoint before a failing event failed"
                );
            }
            return Err(err);
        }
    }

    /// Catches up, then follows new events until `shutdown` is triggered.
    ///
    /// Store errors are logged and retried with exponential backoff: after 100 ms, then
    /// twice as long after each failed retry, up to 30 s (or the idle timeout, if that
    /// is longer), and from 100 ms again once a catch-up succeeds. A projection error or
    /// an event that cannot be decoded stops the subscription and is returned; the
    /// checkpoint stays before that event.
    ///
    /// # Errors
    ///
    /// Returns the projection's error ([`Error::Handler`]) or the decoding error.
    pub async fn run(mut self, shutdown: impl Into<Shutdown>) -> Result<P, Error> {
        let shutdown = shutdown.into();
        let mut backoff = Backoff::new(self.poll_interval);
        loop {
            match self.catch_up().await {
                Ok(n) => {
                    backoff.reset();
                    if n > 0 {
                        debug!(
                            projection = self.projection.name(),
                            handled = n,
                            "caught up"
                        );
                    }
                }
                Err(err @ Error::Store { .. }) => {
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
            }
            let position = match self.store.load_checkpoint(self.projection.name()).await {
                Ok(position) => position.unwrap_or(0),
                // Waiting from the start returns at once, and the catch-up that follows
                // meets the store error and backs off.
                Err(err) => {
                    debug!(projection = self.projection.name(), error = %err, "loading the checkpoint failed");
                    0
                }
            };
            tokio::select! {
                () = shutdown.triggered() => return Ok(self.projection),
                () = self.store.wait_for_events(position, self.poll_interval) => {}
            }
        }
    }
}

/// The delays between retries after store errors: exponential, capped. Shared with
/// `thalo_postgres::PgSubscription` through `__private`; not a public API.
#[doc(hidden)]
#[derive(Debug)]
pub struct Backoff {
    /// The delay before the next retry.
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// The first retry's delay.
    const FIRST: Duration = Duration::from_millis(100);
    /// The longest delay, unless the idle timeout is longer: a subscription that polls
    /// that rarely anyway need not retry more often.
    const MAX: Duration = Duration::from_secs(30);

    pub fn new(poll_interval: Duration) -> Self {
        Backoff {
            next: Self::FIRST,
            max: Self::MAX.max(poll_interval),
        }
    }

    /// The delay to wait now; the next one is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(2).min(self.max);
        delay
    }

    /// After a success: the next failure is retried quickly again.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;
    use crate::{
        AggregateType, EventEnvelope, EventHandler, InMemoryEventStore, Loaded, Metadata, RawEvent,
    };

    /// A tick, or an event type that the reading side does not know (as after a rename):
    /// `decode` rejects `Mystery`, which `encode` writes.
    #[derive(Clone, Debug, PartialEq)]
    enum Tick {
        Ticked(u64),
        Mystery,
    }

    impl Event for Tick {
        fn event_type(&self) -> &'static str {
            match self {
                Tick::Ticked(_) => "Ticked",
                Tick::Mystery => "Mystery",
            }
        }
        fn encode(&self) -> Result<String, Error> {
            Ok(match self {
                Tick::Ticked(n) => n.to_string(),
                Tick::Mystery => "null".to_owned(),
            })
        }
        fn decode(event_type: &str, version: u16, payload: &str) -> Result<Self, Error> {
            match event_type {
                "Ticked" => payload
                    .parse()
                    .map(Tick::Ticked)
                    .map_err(|e| Error::serialization(event_type, e)),
                other => Err(Error::UnknownEventType {
                    event_type: other.to_owned(),
                    version,
                    target: "Tick",
                }),
            }
        }
        fn event_types() -> &'static [&'static str] {
            &["Ticked"]
        }
    }

    #[derive(Debug)]
    struct Ticker {
        id: u64,
    }

    impl AggregateType for Ticker {
        const TYPE: &'static str = "ticker";
    }

    impl Aggregate for Ticker {
        type Id = u64;
        type Command = ();
        type Event = Tick;
        type Error = Error;
        fn new(id: u64) -> Self {
            Ticker { id }
        }
        fn id(&self) -> &u64 {
            &self.id
        }
        fn handle(&self, (): ()) -> Result<Vec<Tick>, Error> {
            Ok(Vec::new())
        }
        fn apply(&mut self, _: Tick) {}
    }

    /// Records the ticks it handled, in order.
    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<u64>>);

    impl Seen {
        fn ticks(&self) -> Vec<u64> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    impl EventHandler<Tick> for Seen {
        async fn handle(&self, envelope: &EventEnvelope<Tick>) -> Result<(), Error> {
            if let Tick::Ticked(n) = envelope.event {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(n);
            }
            Ok(())
        }
    }

    impl Projection<Tick> for Seen {
        fn name(&self) -> &str {
            "seen"
        }
    }

    async fn append(store: &impl EventStore, id: u64, version: u64, events: Vec<Tick>) -> u64 {
        let stored = store
            .append::<Ticker>(&id, version, events, &Metadata::default())
            .await
            .unwrap();
        stored.last().map(|e| e.position).unwrap()
    }

    #[tokio::test]
    async fn a_decode_error_checkpoints_the_events_handled_before_it() {
        let store = InMemoryEventStore::new();
        append(&store, 1, 0, vec![Tick::Ticked(1)]).await;
        let last_good = append(&store, 2, 0, vec![Tick::Ticked(2)]).await;
        append(&store, 1, 1, vec![Tick::Mystery, Tick::Ticked(3)]).await;

        let mut subscription = Subscription::new::<Ticker>(store.clone(), Seen::default());
        let err = subscription.catch_up().await.unwrap_err();
        assert!(
            matches!(&err, Error::UnknownEventType { event_type, .. } if event_type == "Mystery"),
            "{err:?}"
        );
        assert_eq!(subscription.projection().ticks(), [1, 2]);
        assert_eq!(
            store.load_checkpoint("seen").await.unwrap(),
            Some(last_good)
        );

        // The next catch-up starts at the undecodable event: nothing is handled twice.
        let again = subscription.catch_up().await.unwrap_err();
        assert!(matches!(again, Error::UnknownEventType { .. }), "{again:?}");
        assert_eq!(subscription.projection().ticks(), [1, 2]);
        assert_eq!(
            store.load_checkpoint("seen").await.unwrap(),
            Some(last_good)
        );
    }

    #[tokio::test]
    async fn a_decode_error_in_a_later_batch_keeps_the_earlier_batches() {
        let store = InMemoryEventStore::new();
        append(&store, 1, 0, vec![Tick::Ticked(1), Tick::Ticked(2)]).await;
        let last_good = append(&store, 1, 2, vec![Tick::Ticked(3)]).await;
        append(&store, 1, 3, vec![Tick::Mystery]).await;

        let mut subscription =
            Subscription::new::<Ticker>(store.clone(), Seen::default()).with_batch_size(3);
        let err = subscription.catch_up().await.unwrap_err();
        assert!(matches!(err, Error::UnknownEventType { .. }), "{err:?}");
        assert_eq!(subscription.projection().ticks(), [1, 2, 3]);
        assert_eq!(
            store.load_checkpoint("seen").await.unwrap(),
            Some(last_good)
        );
    }

    /// An in-memory store whose `read_all` fails while `failing` is set, and counts its
    /// calls.
    #[derive(Clone, Default)]
    struct Flaky {
        store: InMemoryEventStore,
        failing: Arc<AtomicBool>,
        reads: Arc<AtomicUsize>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Down;

    impl EventStore for Flaky {
        async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<Loaded<A>, Error> {
            self.store.load(id).await
        }

        async fn append<A: Aggregate>(
            &self,
            id: &A::Id,
            expected_version: u64,
            events: Vec<A::Event>,
            metadata: &Metadata,
        ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
            self.store
                .append::<A>(id, expected_version, events, metadata)
                .await
        }

        async fn read_stream<A: Aggregate>(
            &self,
            id: &A::Id,
            after_sequence: u64,
        ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
            self.store.read_stream::<A>(id, after_sequence).await
        }

        async fn read_all(
            &self,
            after_position: u64,
            limit: usize,
        ) -> Result<Vec<EventEnvelope<RawEvent>>, Error> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::store("reading the global log", Down));
            }
            self.store.read_all(after_position, limit).await
        }

        async fn wait_for_events(&self, after_position: u64, timeout: Duration) {
            self.store.wait_for_events(after_position, timeout).await;
        }
    }

    impl CheckpointStore for Flaky {
        async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, Error> {
            self.store.load_checkpoint(name).await
        }

        async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error> {
            self.store.save_checkpoint(name, position).await
        }
    }

    #[tokio::test]
    async fn run_backs_off_on_store_errors_and_recovers() {
        let store = Flaky::default();
        append(&store, 1, 0, vec![Tick::Ticked(1), Tick::Ticked(2)]).await;
        store.failing.store(true, Ordering::SeqCst);

        let seen = Arc::new(Seen::default());
        let stop = crate::Shutdown::new();
        // A long idle timeout: only the backoff decides how often a failing store is
        // asked again.
        let subscription = Subscription::new::<Ticker>(store.clone(), Arc::clone(&seen))
            .with_poll_interval(Duration::from_secs(60));
        let running = tokio::spawn(subscription.run(stop.clone()));

        // Reads at about 0, 0.1, 0.3 and 0.7 s (the next at 1.5 s): 4 in 1.2 s, where an
        // immediate retry would read thousands of times.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let reads = store.reads.load(Ordering::SeqCst);
        assert!((3..=5).contains(&reads), "{reads} reads in 1.2 s");
        assert!(seen.ticks().is_empty());

        store.failing.store(false, Ordering::SeqCst);
        let caught_up = tokio::time::timeout(Duration::from_secs(10), async {
            while seen.ticks().len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(caught_up.is_ok(), "the subscription never recovered");
        assert_eq!(seen.ticks(), [1, 2]);
        assert_eq!(store.load_checkpoint("seen").await.unwrap(), Some(2));

        // Recovered: a new event is handled as it comes (the wait is back on wake-ups).
        append(&store, 1, 2, vec![Tick::Ticked(3)]).await;
        let followed = tokio::time::timeout(Duration::from_secs(5), async {
            while seen.ticks().len() < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(followed.is_ok(), "the new event was not handled");

        stop.trigger();
        let projection = running.await.unwrap().unwrap();
        assert_eq!(projection.ticks(), [1, 2, 3]);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let delays: Vec<Duration> = (0..11).map(|_| backoff.next_delay()).collect();
        let millis = [
            100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000,
        ];
        assert_eq!(
            delays,
            millis.map(Duration::from_millis).to_vec(),
            "{delays:?}"
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));

        // A longer idle timeout raises the cap.
        let mut backoff = Backoff::new(Duration::from_secs(60));
        let last = (0..20).map(|_| backoff.next_delay()).last();
        assert_eq!(last, Some(Duration::from_secs(60)));
    }
}
