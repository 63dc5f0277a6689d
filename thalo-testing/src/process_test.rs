//! Given / when / then for process managers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Debug};
use std::time::Duration;

use thalo::{
    Action, Aggregate, CommandId, Error, Event, EventEnvelope, InMemoryEventStore, Metadata,
    ProcessManager,
};
use uuid::Uuid;

/// The store the harness asks a process manager's actions for. Commands are inspected,
/// never executed.
type Store = InMemoryEventStore;

/// A process manager instance under test: feed its past with
/// [`given`](ProcessManagerTest::given), then one event with
/// [`when`](ProcessManagerTest::when) or a timer with
/// [`when_timer`](ProcessManagerTest::when_timer), and check the [`ProcessOutcome`]:
/// the commands it issued (by their `Display` text, `step: aggregate_type/id Command`),
/// their idempotency keys, its timers (with their delays), its state, whether it
/// completed.
///
/// As in the runners, only a pending timer of a running instance fires:
/// [`when_timer`](ProcessManagerTest::when_timer) and
/// [`given_timer`](ProcessManagerTest::given_timer) panic for a timer that was never set
/// (or was cancelled, or fired already) and for a completed instance.
///
/// Commands are not executed; they succeed unless a step is declared rejected with
/// [`rejecting`](ProcessManagerTest::rejecting), in which case
/// [`ProcessManager::on_rejected`] is called with that error and its actions follow, as
/// the runners do. Every event goes through [`Event::encode`] and
/// [`Event::decode_from`] on the way.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use thalo::{commands, events, Action, Aggregate, Error, EventEnvelope, EventStore, ProcessManager};
/// # use thalo_testing::ProcessManagerTest;
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Order {
///     #[identity]
///     id: String,
/// }
/// #[commands]
/// impl Order {
///     pub fn place(&self) -> Result<PlacedEvent, Error> { Ok(PlacedEvent {}) }
///     pub fn cancel(&self) -> Result<CancelledEvent, Error> { Ok(CancelledEvent {}) }
/// }
/// #[events]
/// impl Order {
///     pub fn placed(&mut self) {}
///     pub fn cancelled(&mut self) {}
/// }
/// thalo::event_set! {
///     /// Orders.
///     pub enum Orders { Order(Order) }
/// }
///
/// struct Expiry;
///
/// #[derive(Clone, Debug, Default, Serialize, Deserialize)]
/// struct Pending { order: String }
///
/// impl ProcessManager for Expiry {
///     type Event = Orders;
///     type State = Pending;
///     fn name(&self) -> &str { "expiry" }
///     fn correlate(&self, e: &EventEnvelope<Orders>) -> Option<String> {
///         Some(e.aggregate_id.clone())
///     }
///     fn react<S: EventStore>(&self, state: &mut Pending, e: &EventEnvelope<Orders>) -> Result<Vec<Action<S>>, Error> {
///         state.order = e.aggregate_id.clone();
///         Ok(match e.event {
///             Orders::Order(OrderEvent::Placed(_)) => vec![Action::set_timer("expire", std::time::Duration::from_secs(60))],
///             Orders::Order(OrderEvent::Cancelled(_)) => vec![Action::Complete],
///         })
///     }
///     fn on_timer<S: EventStore>(&self, state: &mut Pending, _: &str) -> Result<Vec<Action<S>>, Error> {
///         Ok(vec![Action::command::<Order>("cancel", state.order.clone(), OrderCommand::Cancel {})])
///     }
/// }
///
/// ProcessManagerTest::new(Expiry)
///     .when::<Order>("o-1".to_owned(), PlacedEvent {})
///     .then_timer_set("expire")
///     .then_timer_set_after("expire", std::time::Duration::from_secs(60))
///     .then_commands(&[]);
/// ProcessManagerTest::new(Expiry)
///     .given::<Order>("o-1".to_owned(), PlacedEvent {})
///     .when_timer("expire")
///     .then_commands(&["cancel: order/o-1 Cancel"]);
/// ```
pub struct ProcessManagerTest<P: ProcessManager> {
    manager: P,
    state: P::State,
    completed: bool,
    timers: BTreeMap<String, PendingTimer>,
    rejections: HashMap<String, Error>,
    position: u64,
    sequences: HashMap<(&'static str, String), u64>,
}

impl<P: ProcessManager> Debug for ProcessManagerTest<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessManagerTest")
            .field("manager", &self.manager.name())
            .field("state", &self.state)
            .field("completed", &self.completed)
            .field("timers", &self.timers)
            .finish_non_exhaustive()
    }
}

impl<P: ProcessManager> ProcessManagerTest<P> {
    /// A fresh instance of `manager`: default state, no timers.
    pub fn new(manager: P) -> Self {
        ProcessManagerTest {
            manager,
            state: P::State::default(),
            completed: false,
            timers: BTreeMap::new(),
            rejections: HashMap::new(),
            position: 0,
            sequences: HashMap::new(),
        }
    }

    /// Starts the instance from `state` instead of the default.
    #[must_use]
    pub fn with_state(mut self, state: P::State) -> Self {
        self.state = state;
        self
    }

    /// From now on, the command of `step` is rejected with `error` (an
    /// [`Error::Invariant`] or [`Error::Domain`]) instead of succeeding.
    #[must_use]
    pub fn rejecting(mut self, step: impl Into<String>, error: Error) -> Self {
        self.rejections.insert(step.into(), error);
        self
    }

    /// Feeds a past event of aggregate `A` with identity `id` (its commands count as
    /// succeeded or rejected, its timers as set).
    ///
    /// # Panics
    ///
    /// When the process manager fails on it, or the event does not survive a JSON
    /// round trip.
    #[must_use]
    #[track_caller]
    pub fn given<A>(mut self, id: A::Id, event: impl Into<A::Event>) -> Self
    where
        A: Aggregate,
        P::Event: From<A::Event>,
    {
        let envelope = self.envelope::<A>(&id, event.into());
        let outcome = self.step(Trigger::Event(&envelope));
        if let Err(err) = outcome {
            panic!("given event {:?} failed: {err}", envelope.event);
        }
        self
    }

    /// Fires the pending timer `name` in the instance's past (its commands count as
    /// succeeded or rejected, its timers as set).
    ///
    /// # Panics
    ///
    /// When the timer is not pending or the instance has completed (the runners would
    /// not fire it; see [`when_timer`](ProcessManagerTest::when_timer)), or the process
    /// manager fails on it.
    #[must_use]
    #[track_caller]
    pub fn given_timer(mut self, name: &str) -> Self {
        let timer = self.pending_timer(name, "given_timer");
        if let Err(err) = self.step(Trigger::Timer(name, timer.id)) {
            panic!("given timer `{name}` failed: {err}");
        }
        self
    }

    /// The instance's state so far.
    pub fn state(&self) -> &P::State {
        &self.state
    }

    /// Feeds one event of aggregate `A` with identity `id` and captures what the process
    /// manager did.
    ///
    /// # Panics
    ///
    /// When the event does not survive a JSON round trip.
    #[track_caller]
    pub fn when<A>(mut self, id: A::Id, event: impl Into<A::Event>) -> ProcessOutcome<P>
    where
        A: Aggregate,
        P::Event: From<A::Event>,
    {
        let envelope = self.envelope::<A>(&id, event.into());
        let result = self.step(Trigger::Event(&envelope));
        self.outcome(result)
    }

    /// Fires the pending timer `name` and captures what the process manager did.
    ///
    /// # Panics
    ///
    /// When the timer is not pending (never set by a `given` event or timer, cancelled,
    /// replaced by completion, or fired already) or the instance has completed: the
    /// runners fire only the pending timers of running instances, so such a firing
    /// would test something that cannot happen.
    #[track_caller]
    pub fn when_timer(mut self, name: &str) -> ProcessOutcome<P> {
        let timer = self.pending_timer(name, "when_timer");
        let result = self.step(Trigger::Timer(name, timer.id));
        self.outcome(result)
    }

    /// The pending timer `name`, or a panic explaining why `method` cannot fire it.
    #[track_caller]
    fn pending_timer(&self, name: &str, method: &str) -> PendingTimer {
        if self.completed {
            panic!(
                "{method}(\"{name}\"): the instance has completed, and the runners never fire \
                 a completed instance's timers"
            );
        }
        match self.timers.get(name) {
            Some(timer) => *timer,
            None => panic!(
                "{method}(\"{name}\"): the timer is not pending (pending: {:?}); the runners \
                 fire only timers set by an earlier event or timer and not cancelled or \
                 fired since",
                self.timers.keys().collect::<Vec<_>>()
            ),
        }
    }

    fn outcome(self, result: Result<Step, Error>) -> ProcessOutcome<P> {
        ProcessOutcome {
            result,
            state: self.state,
            completed: self.completed,
            timers: self.timers,
        }
    }

    #[track_caller]
    fn envelope<A>(&mut self, id: &A::Id, event: A::Event) -> EventEnvelope<P::Event>
    where
        A: Aggregate,
        P::Event: From<A::Event>,
    {
        let payload = event
            .encode()
            .unwrap_or_else(|err| panic!("event {event:?} does not serialize: {err}"));
        let decoded = P::Event::decode_from(
            A::TYPE,
            event.event_type(),
            event.event_version(),
            &payload,
        )
        .unwrap_or_else(|err| {
            panic!("event {event:?} does not deserialize from its own payload {payload}: {err}")
        });
        self.position += 1;
        let sequence = self
            .sequences
            .entry((A::TYPE, id.to_string()))
            .and_modify(|s| *s += 1)
            .or_insert(1);
        EventEnvelope {
            id: Uuid::now_v7(),
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: id.to_string(),
            sequence: *sequence,
            position: self.position,
            timestamp: chrono::Utc::now(),
            metadata: Metadata::new(),
            event: decoded,
        }
    }

    /// Runs one event or timer: the commands issued, by their `Display` text, and
    /// their keys.
    fn step(&mut self, trigger: Trigger<'_, P::Event>) -> Result<Step, Error> {
        let (cause, actions) = match trigger {
            Trigger::Event(envelope) => {
                if self.completed || self.manager.correlate(envelope).is_none() {
                    return Ok(Step {
                        cause: envelope.id,
                        commands: Vec::new(),
                        keys: Vec::new(),
                    });
                }
                (
                    envelope.id,
                    self.manager.react::<Store>(&mut self.state, envelope)?,
                )
            }
            Trigger::Timer(name, id) => {
                self.timers.remove(name);
                (id, self.manager.on_timer::<Store>(&mut self.state, name)?)
            }
        };
        let mut queue: std::collections::VecDeque<Action<Store>> = actions.into();
        let mut step = Step {
            cause,
            commands: Vec::new(),
            keys: Vec::new(),
        };
        let mut rounds = 0;
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Command(command) => {
                    step.commands.push(command.to_string());
                    step.keys.push((
                        command.step().to_owned(),
                        thalo::__private::command_key(cause, command.step()),
                    ));
                    if let Some(error) = self.rejections.get(command.step()) {
                        // As the runners: compensations rejected again and again stop.
                        rounds += 1;
                        if rounds > thalo::__private::MAX_REJECTION_ROUNDS {
                            return Err(Error::handler(
                                self.manager.name(),
                                format!(
                                    "more than {} rejected commands in a row",
                                    thalo::__private::MAX_REJECTION_ROUNDS
                                ),
                            ));
                        }
                        let more = self.manager.on_rejected::<Store>(
                            &mut self.state,
                            command.step(),
                            error,
                        )?;
                        for action in more.into_iter().rev() {
                            queue.push_front(action);
                        }
                    }
                }
                Action::SetTimer { name, after } => {
                    // A new id, as the runners give a timer set again.
                    let id = Uuid::new_v4();
                    self.timers.insert(name, PendingTimer { after, id });
                }
                Action::CancelTimer { name } => {
                    self.timers.remove(&name);
                }
                Action::Complete => {
                    self.completed = true;
                    self.timers.clear();
                }
            }
        }
        Ok(step)
    }
}

enum Trigger<'a, E> {
    Event(&'a EventEnvelope<E>),
    /// A timer, with its id (the cause of its commands' keys).
    Timer(&'a str, Uuid),
}

/// A pending timer: its delay, and its id.
#[derive(Clone, Copy)]
struct PendingTimer {
    after: Duration,
    id: Uuid,
}

impl Debug for PendingTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Debug::fmt(&self.after, f)
    }
}

/// What one event or timer issued.
#[derive(Debug)]
struct Step {
    /// The id of the event or timer.
    cause: Uuid,
    /// The commands' `Display` texts.
    commands: Vec<String>,
    /// The commands' steps and keys, in the same order.
    keys: Vec<(String, CommandId)>,
}

/// What one event or timer did to a process manager instance.
pub struct ProcessOutcome<P: ProcessManager> {
    result: Result<Step, Error>,
    state: P::State,
    completed: bool,
    timers: BTreeMap<String, PendingTimer>,
}

impl<P: ProcessManager> Debug for ProcessOutcome<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessOutcome")
            .field("result", &self.result)
            .field("state", &self.state)
            .field("completed", &self.completed)
            .field("timers", &self.timers)
            .finish()
    }
}

impl<P: ProcessManager> ProcessOutcome<P> {
    /// Asserts the commands issued, in order (rejected ones included), by their
    /// `Display` text: `step: aggregate_type/aggregate_id Command { .. }`.
    ///
    /// # Panics
    ///
    /// When the process manager failed or issued other commands.
    #[track_caller]
    pub fn then_commands(self, expected: &[&str]) -> Self {
        match &self.result {
            Ok(step) => assert_eq!(
                step.commands, expected,
                "the process manager issued other commands"
            ),
            Err(err) => {
                panic!("expected commands {expected:?}, the process manager failed: {err:?}")
            }
        }
        self
    }

    /// Asserts that the timer `name` is pending afterwards.
    ///
    /// # Panics
    ///
    /// When it is not, or the process manager failed.
    #[track_caller]
    pub fn then_timer_set(self, name: &str) -> Self {
        self.assert_ok();
        assert!(
            self.timers.contains_key(name),
            "expected timer `{name}` to be set; pending: {:?}",
            self.timers
        );
        self
    }

    /// Asserts that the timer `name` is pending afterwards, set with the delay `after`
    /// (by the last action that set it).
    ///
    /// # Panics
    ///
    /// When it is not pending, has another delay, or the process manager failed.
    #[track_caller]
    pub fn then_timer_set_after(self, name: &str, after: Duration) -> Self {
        self.assert_ok();
        match self.timers.get(name) {
            Some(timer) => assert_eq!(
                timer.after, after,
                "timer `{name}` is set with another delay"
            ),
            None => panic!(
                "expected timer `{name}` to be set after {after:?}; pending: {:?}",
                self.timers
            ),
        }
        self
    }

    /// Asserts that the timer `name` is not pending afterwards (cancelled, fired, or
    /// never set).
    ///
    /// # Panics
    ///
    /// When it is, or the process manager failed.
    #[track_caller]
    pub fn then_timer_not_set(self, name: &str) -> Self {
        self.assert_ok();
        assert!(
            !self.timers.contains_key(name),
            "expected timer `{name}` not to be set; pending: {:?}",
            self.timers
        );
        self
    }

    /// Asserts that the instance completed.
    ///
    /// # Panics
    ///
    /// When it did not, or the process manager failed.
    #[track_caller]
    pub fn then_completed(self) -> Self {
        self.assert_ok();
        assert!(self.completed, "expected the instance to complete");
        self
    }

    /// Asserts that the instance is still running.
    ///
    /// # Panics
    ///
    /// When it completed, or the process manager failed.
    #[track_caller]
    pub fn then_running(self) -> Self {
        self.assert_ok();
        assert!(!self.completed, "expected the instance to keep running");
        self
    }

    /// Checks the state afterwards with `check` (which asserts).
    ///
    /// # Panics
    ///
    /// When the process manager failed, or as `check` does.
    #[track_caller]
    pub fn then_state(self, check: impl FnOnce(&P::State)) -> Self {
        self.assert_ok();
        check(&self.state);
        self
    }

    /// Checks the process manager's error with `check`.
    ///
    /// # Panics
    ///
    /// When the process manager did not fail, or as `check` does.
    #[track_caller]
    pub fn then_error(self, check: impl FnOnce(&Error)) {
        match &self.result {
            Ok(step) => panic!(
                "expected an error, the process manager issued {:?}",
                step.commands
            ),
            Err(err) => check(err),
        }
    }

    /// Asserts that the commands issued have distinct idempotency keys, i.e. distinct
    /// steps: a runner would replay the first command of a reused step instead of
    /// executing the second.
    ///
    /// # Panics
    ///
    /// When two commands share a step, or the process manager failed.
    #[track_caller]
    pub fn then_command_keys_unique(self) -> Self {
        self.assert_ok();
        if let Ok(step) = &self.result {
            let mut seen = HashSet::new();
            for (name, key) in &step.keys {
                assert!(
                    seen.insert(key),
                    "step `{name}` issued two commands under one key ({key}); commands: {:?}",
                    step.commands
                );
            }
        }
        self
    }

    /// The commands issued, by their `Display` text, or the error.
    pub fn commands(&self) -> Result<&[String], &Error> {
        self.result.as_ref().map(|step| step.commands.as_slice())
    }

    /// The idempotency keys the runners would execute the commands under, with their
    /// steps, in the order of [`commands`](ProcessOutcome::commands):
    /// `CommandId::caused_by(event, step)` for an event, the same derivation from the
    /// timer's id for a timer (see [`cause`](ProcessOutcome::cause)).
    pub fn command_keys(&self) -> Result<&[(String, CommandId)], &Error> {
        self.result.as_ref().map(|step| step.keys.as_slice())
    }

    /// The id of the event (its [`EventEnvelope::id`]) or timer that this outcome is
    /// for: the cause its commands' keys derive from.
    ///
    /// # Panics
    ///
    /// When the process manager failed.
    #[track_caller]
    pub fn cause(&self) -> Uuid {
        match &self.result {
            Ok(step) => step.cause,
            Err(err) => panic!("the process manager failed: {err:?}"),
        }
    }

    /// The state afterwards.
    pub fn state(&self) -> &P::State {
        &self.state
    }

    #[track_caller]
    fn assert_ok(&self) {
        if let Err(err) = &self.result {
            panic!("the process manager failed: {err:?}");
        }
    }
}
