//! How far a running subscription has got, and waiting for it: read-your-writes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Error, EventEnvelope};

/// A cloneable view of how far a subscription ([`Subscription`](crate::Subscription),
/// `thalo_postgres::PgSubscription`) has got while it runs, and a way to wait until it
/// has handled given events: *read-your-writes*.
///
/// An HTTP handler that executes a command and then answers with data from a read
/// model would otherwise race the projection: the command's events are stored, but the
/// projection may not have applied them yet. Passing the stored events to
/// [`wait_until_projected`](Progress::wait_until_projected) makes it return once the
/// read model shows them (Marten's "wait for non-stale data").
///
/// Take the handle with the subscription's `progress()` before calling `run` (which
/// consumes the subscription); every clone follows the same subscription. Waiting takes
/// no lock the subscription holds and makes no request to the store: the subscription
/// publishes its checkpoint after every batch.
///
/// For a projection run in another process (or fed from Kafka) use the checkpoints in
/// the store instead: `thalo_postgres::PgEventStore::wait_until_projected`.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use thalo::{commands, events, Aggregate, Error, EventEnvelope, EventHandler, Projection};
/// use thalo::{InMemoryEventStore, Repository, Shutdown, Subscription};
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
/// let total = Arc::new(Total::default());
/// let subscription = Subscription::new::<Counter>(store.clone(), total.clone());
/// let progress = subscription.progress();
/// let shutdown = Shutdown::new();
/// let running = tokio::spawn(subscription.run(shutdown.clone()));
///
/// let repo = Repository::new(store);
/// let stored = repo.execute::<Counter>(&1, CounterCommand::Increment { by: 5 }).await?;
/// // Returns once the projection has handled the command's events.
/// progress.wait_until_projected(&stored, Duration::from_secs(5)).await?;
/// assert_eq!(total.0.load(Ordering::SeqCst), 5);
/// assert!(progress.report().position >= stored[0].position);
///
/// shutdown.trigger();
/// running.await.unwrap()?;
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Progress {
    report: Arc<watch::Sender<ProgressReport>>,
}

/// What a [`Progress`] shows: the subscription's checkpoint and what it did since it
/// started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProgressReport {
    /// The global position through which every event of the log has been handled (or
    /// was not the projection's): the subscription's checkpoint. 0 before its first
    /// batch.
    pub position: u64,
    /// Events handed to the projection since the subscription was created.
    pub handled: u64,
    /// Whether the last catch-up read to the end of the log (no more events were
    /// waiting then). False before the first catch-up.
    pub caught_up: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// A new handle at position 0. Subscriptions create one; implementations of other
    /// subscriptions publish to it with [`advance`](Progress::advance).
    pub fn new() -> Self {
        Progress {
            report: Arc::new(watch::Sender::new(ProgressReport::default())),
        }
    }

    /// The latest report.
    pub fn report(&self) -> ProgressReport {
        *self.report.borrow()
    }

    /// The subscription's checkpoint: every event at or below it has been handled.
    pub fn position(&self) -> u64 {
        self.report.borrow().position
    }

    /// Publishes that the subscription's checkpoint is `position` (never moves back),
    /// that it handled `handled` more events, and whether it read to the end of the log.
    /// For subscription implementations; waiters wake up.
    pub fn advance(&self, position: u64, handled: u64, caught_up: bool) {
        self.report.send_modify(|report| {
            report.position = report.position.max(position);
            report.handled += handled;
            report.caught_up = caught_up;
        });
    }

    /// Waits until the checkpoint is at least `position`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when it is not within `timeout` (the subscription is behind,
    /// stopped, or failing).
    pub async fn wait_for_position(&self, position: u64, timeout: Duration) -> Result<(), Error> {
        let mut receiver = self.report.subscribe();
        let reached = async {
            // The sender lives as long as `self`: `wait_for` cannot see it closed.
            receiver
                .wait_for(|report| report.position >= position)
                .await
                .is_ok()
        };
        match tokio::time::timeout(timeout, reached).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::timeout(
                format!(
                    "waiting for the subscription to reach position {position} (it is at {})",
                    self.position()
                ),
                timeout,
            )),
        }
    }

    /// Waits until the subscription has handled `events` (as returned by
    /// [`Repository::execute`](crate::Repository::execute)): returns at once for no
    /// events.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when they are not all handled within `timeout`.
    pub async fn wait_until_projected<E>(
        &self,
        events: &[EventEnvelope<E>],
        timeout: Duration,
    ) -> Result<(), Error> {
        match events.iter().map(|e| e.position).max() {
            Some(position) => self.wait_for_position(position, timeout).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_position_and_times_out_when_behind() {
        let progress = Progress::new();
        let waiter = progress.clone();
        let waiting =
            tokio::spawn(async move { waiter.wait_for_position(3, Duration::from_secs(5)).await });
        progress.advance(2, 2, false);
        progress.advance(3, 1, true);
        waiting.await.unwrap().unwrap();
        assert_eq!(
            progress.report(),
            ProgressReport {
                position: 3,
                handled: 3,
                caught_up: true
            }
        );

        // Never moves back.
        progress.advance(1, 0, true);
        assert_eq!(progress.position(), 3);

        let err = progress
            .wait_for_position(4, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert_eq!(
            err.to_string(),
            "timed out after 20 ms: waiting for the subscription to reach position 4 (it is at 3)"
        );
        let none: [EventEnvelope<()>; 0] = [];
        progress
            .wait_until_projected(&none, Duration::ZERO)
            .await
            .unwrap();
    }
}
