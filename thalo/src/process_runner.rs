//! The in-process runner of a process manager: state, timers and checkpoint in memory.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::process::{execute_actions, handler_error, Effects, TimerChange};
use crate::subscription::Backoff;
use crate::{Error, EventEnvelope, EventSet, EventStore, ProcessManager, Repository, Shutdown};

/// Runs a [`ProcessManager`] in process: feeds it the events of its event set's
/// aggregate types from a store, in global order, executes its commands through a
/// [`Repository`] exactly once, and fires its timers.
///
/// Its instances' states, its timers and its checkpoint live in memory, which suits an
/// embedded application over an [`InMemoryEventStore`](crate::InMemoryEventStore)
/// (both are gone after a restart). The semantics are those of the durable
/// `thalo_postgres::PgProcessManager`: an event whose commands fail with a store error
/// is not saved and runs again on the next catch-up, with the same command keys.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
/// use thalo::{commands, events, Action, Aggregate, Error, EventEnvelope, EventStore};
/// use thalo::{InMemoryEventStore, ProcessManager, ProcessRunner, Repository};
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Order {
///     #[identity]
///     id: String,
///     paid: bool,
/// }
///
/// #[commands]
/// impl Order {
///     pub fn place(&self) -> Result<PlacedEvent, Error> {
///         Ok(PlacedEvent {})
///     }
///     pub fn cancel(&self) -> Result<Option<CancelledEvent>, Error> {
///         Ok((!self.paid).then_some(CancelledEvent {}))
///     }
/// }
///
/// #[events]
/// impl Order {
///     pub fn placed(&mut self) {}
///     pub fn cancelled(&mut self) {}
/// }
///
/// thalo::event_set! {
///     /// What the expiry reads: orders only.
///     pub enum Orders {
///         Order(Order),
///     }
/// }
///
/// /// Cancels an order that is still there after 10 ms.
/// struct Expiry;
///
/// #[derive(Clone, Debug, Default, Serialize, Deserialize)]
/// struct Pending {
///     order: String,
/// }
///
/// impl ProcessManager for Expiry {
///     type Event = Orders;
///     type State = Pending;
///
///     fn name(&self) -> &str {
///         "expiry"
///     }
///
///     fn correlate(&self, envelope: &EventEnvelope<Orders>) -> Option<String> {
///         Some(envelope.aggregate_id.clone())
///     }
///
///     fn react<S: EventStore>(
///         &self,
///         state: &mut Pending,
///         envelope: &EventEnvelope<Orders>,
///     ) -> Result<Vec<Action<S>>, Error> {
///         Ok(match envelope.event {
///             Orders::Order(OrderEvent::Placed(_)) => {
///                 state.order = envelope.aggregate_id.clone();
///                 vec![Action::set_timer("expire", Duration::from_millis(10))]
///             }
///             Orders::Order(OrderEvent::Cancelled(_)) => vec![Action::Complete],
///         })
///     }
///
///     fn on_timer<S: EventStore>(&self, state: &mut Pending, _: &str) -> Result<Vec<Action<S>>, Error> {
///         Ok(vec![Action::command::<Order>("cancel", state.order.clone(), OrderCommand::Cancel {})])
///     }
/// }
///
/// let store = InMemoryEventStore::new();
/// let repo = Repository::new(store.clone());
/// repo.execute::<Order>(&"o-1".to_owned(), OrderCommand::Place {}).await?;
///
/// let mut runner = ProcessRunner::new(repo.clone(), Expiry);
/// runner.catch_up().await?;
/// assert_eq!(runner.timers("o-1"), ["expire"]);
/// tokio::time::sleep(Duration::from_millis(20)).await;
/// assert_eq!(runner.fire_due_timers().await?, 1);
/// runner.catch_up().await?; // sees OrderCancelled
/// assert!(runner.is_completed("o-1"));
/// assert_eq!(repo.load::<Order>(&"o-1".to_owned()).await?.version, 2);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct ProcessRunner<S, P: ProcessManager> {
    repository: Repository<S>,
    manager: P,
    /// Whether an aggregate type's events are read.
    includes: fn(&str) -> bool,
    position: u64,
    instances: HashMap<String, Instance<P::State>>,
    /// Timers by (instance, name).
    timers: BTreeMap<(String, String), Timer>,
    batch_size: usize,
    poll_interval: Duration,
}

#[derive(Debug)]
struct Instance<T> {
    state: T,
    completed: bool,
}

#[derive(Clone, Copy, Debug)]
struct Timer {
    /// With the step, the key of the commands it issues.
    id: Uuid,
    due: Instant,
}

impl<S, P> ProcessRunner<S, P>
where
    S: EventStore,
    P: ProcessManager,
{
    /// A runner of `manager` whose commands go through `repository` (and whose events
    /// are read from its store).
    pub fn new(repository: Repository<S>, manager: P) -> Self {
        ProcessRunner {
            repository,
            manager,
            includes: <P::Event as EventSet>::includes,
            position: 0,
            instances: HashMap::new(),
            timers: BTreeMap::new(),
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
        }
    }

    /// How many events to read per batch (default 500).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long to wait for new events before polling again (default 1 s).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The process manager.
    pub fn manager(&self) -> &P {
        &self.manager
    }

    /// The position of the last event handled.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The state of `instance`, if it has seen an event.
    pub fn state(&self, instance: &str) -> Option<&P::State> {
        self.instances.get(instance).map(|i| &i.state)
    }

    /// Whether `instance` has completed.
    pub fn is_completed(&self, instance: &str) -> bool {
        self.instances.get(instance).is_some_and(|i| i.completed)
    }

    /// The names of `instance`'s pending timers, sorted.
    pub fn timers(&self, instance: &str) -> Vec<&str> {
        self.timers
            .keys()
            .filter(|(i, _)| i == instance)
            .map(|(_, name)| name.as_str())
            .collect()
    }

    /// Handles every event stored so far that the runner has not seen, and returns how
    /// many events it handed to the process manager.
    ///
    /// # Errors
    ///
    /// The store's error, a decoding error, or the process manager's
    /// ([`Error::Handler`]). The failing event is not saved: the next catch-up starts
    /// with it.
    pub async fn catch_up(&mut self) -> Result<u64, Error> {
        let mut handled = 0;
        loop {
            let batch = self
                .repository
                .store()
                .read_all(self.position, self.batch_size)
                .await?;
            let Some(last) = batch.last().map(|e| e.position) else {
                return Ok(handled);
            };
            for raw in &batch {
                if (self.includes)(&raw.aggregate_type) {
                    let envelope = raw.decode::<P::Event>()?;
                    if self.handle(&envelope).await? {
                        handled += 1;
                    }
                }
                self.position = raw.position;
            }
            self.position = last;
            if batch.len() < self.batch_size {
                return Ok(handled);
            }
        }
    }

    /// Handles one event; whether it belonged to a running instance.
    async fn handle(&mut self, envelope: &EventEnvelope<P::Event>) -> Result<bool, Error> {
        let Some(instance) = self.manager.correlate(envelope) else {
            return Ok(false);
        };
        let mut state = match self.instances.get(&instance) {
            Some(i) if i.completed => return Ok(false),
            Some(i) => i.state.clone(),
            None => P::State::default(),
        };
        let actions = self
            .manager
            .react::<S>(&mut state, envelope)
            .map_err(|e| handler_error(self.manager.name(), e))?;
        let effects = execute_actions(
            &self.manager,
            &self.repository,
            &mut state,
            envelope.id,
            actions,
        )
        .await?;
        self.save(instance, state, effects);
        Ok(true)
    }

    /// Fires every timer that is due, earliest first, and returns how many fired.
    ///
    /// A timer fires only if it is still pending when its turn comes: one that an
    /// earlier firing of the same call cancelled, replaced (set again under its name) or
    /// cancelled by completing the instance does not fire (a replacement fires at its
    /// own time), and a completed instance's timers never fire.
    ///
    /// # Errors
    ///
    /// As [`catch_up`](ProcessRunner::catch_up); the failing timer stays due.
    pub async fn fire_due_timers(&mut self) -> Result<u64, Error> {
        let now = Instant::now();
        let mut due: Vec<((String, String), Timer)> = self
            .timers
            .iter()
            .filter(|(_, t)| t.due <= now)
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        due.sort_by_key(|(_, t)| t.due);
        let mut fired = 0;
        for (key, timer) in due {
            // An earlier timer of this call may have cancelled or replaced this one (a
            // replacement has a new id), or completed its instance.
            if self.timers.get(&key).map(|t| t.id) != Some(timer.id) {
                continue;
            }
            let (instance, name) = key;
            let mut state = match self.instances.get(&instance) {
                Some(i) if i.completed => {
                    self.timers.remove(&(instance, name));
                    continue;
                }
                Some(i) => i.state.clone(),
                None => P::State::default(),
            };
            let actions = self
                .manager
                .on_timer::<S>(&mut state, &name)
                .map_err(|e| handler_error(self.manager.name(), e))?;
            let effects = execute_actions(
                &self.manager,
                &self.repository,
                &mut state,
                timer.id,
                actions,
            )
            .await?;
            self.timers.remove(&(instance.clone(), name));
            self.save(instance, state, effects);
            fired += 1;
        }
        Ok(fired)
    }

    fn save(&mut self, instance: String, state: P::State, effects: Effects) {
        let now = Instant::now();
        for change in effects.timers {
            match change {
                TimerChange::Set { name, after } => {
                    self.timers.insert(
                        (instance.clone(), name),
                        Timer {
                            id: Uuid::new_v4(),
                            due: now + after,
                        },
                    );
                }
                TimerChange::Cancel { name } => {
                    self.timers.remove(&(instance.clone(), name));
                }
            }
        }
        // Completion is final: nothing saved afterwards makes the instance run again.
        let completed = effects.completed || self.is_completed(&instance);
        if completed {
            self.timers.retain(|(i, _), _| *i != instance);
        }
        self.instances
            .insert(instance, Instance { state, completed });
    }

    /// Catches up and fires due timers until `shutdown` is triggered, then returns the
    /// runner (with its states and timers).
    ///
    /// Store errors, and commands that kept conflicting, are logged and retried with
    /// exponential backoff (100 ms doubling up to 30 s); the process manager's errors
    /// stop the runner.
    ///
    /// # Errors
    ///
    /// The process manager's error ([`Error::Handler`]) or a decoding error.
    pub async fn run(mut self, shutdown: impl Into<Shutdown>) -> Result<Self, Error> {
        let shutdown = shutdown.into();
        let mut backoff = Backoff::new(self.poll_interval);
        loop {
            let result = match self.catch_up().await {
                Ok(_) => self.fire_due_timers().await.map(|_| ()),
                Err(err) => Err(err),
            };
            match result {
                Ok(()) => backoff.reset(),
                // A command that kept conflicting is retried like a store error.
                Err(err) if matches!(err, Error::Store { .. }) || err.is_conflict() => {
                    let delay = backoff.next_delay();
                    warn!(process_manager = self.manager.name(), error = %err, retry_in = ?delay, "process manager failed, retrying");
                    tokio::select! {
                        () = shutdown.triggered() => return Ok(self),
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
                Err(err) => return Err(err),
            }
            let wait = match self.timers.values().map(|t| t.due).min() {
                Some(due) => due
                    .saturating_duration_since(Instant::now())
                    .min(self.poll_interval),
                None => self.poll_interval,
            };
            debug!(
                process_manager = self.manager.name(),
                position = self.position,
                ?wait,
                "idle"
            );
            tokio::select! {
                () = shutdown.triggered() => return Ok(self),
                () = self.repository.store().wait_for_events(self.position, wait) => {}
            }
        }
    }
}
